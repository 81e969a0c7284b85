"""The generator service: steered, streaming generation over gRPC."""
