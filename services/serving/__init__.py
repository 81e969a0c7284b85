"""gRPC plumbing shared by the tagger and generator services: server start-up, health,
reflection, TLS, the shared-token check, and the one interceptor that maps domain errors
to status codes. The steering core never imports this package."""
