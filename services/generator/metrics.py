"""Prometheus metrics of the generator, in a registry of its own (tests run several
generators in one process), served over HTTP when a port is given."""

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GeneratorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tokens = Counter("steer_tokens_generated", "Tokens generated", ["model"], registry=r)
        self.tokens_per_second = Gauge(
            "steer_tokens_per_second", "Tokens generated per second over the last 10 seconds", ["model"], registry=r
        )
        self.batch_streams = Gauge("steer_batch_streams", "Streams in the running batch", ["model"], registry=r)
        self.batch_occupancy = Gauge(
            "steer_batch_occupancy", "Running streams as a fraction of the batch limit", ["model"], registry=r
        )
        self.queue_depth = Gauge("steer_queue_depth", "Requests waiting to join the batch", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "steer_time_to_first_token_seconds", "From submission to the first text sent", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        # What a child waits for: Blip speaks nothing until a whole sentence is checked and released.
        self.time_to_first_sentence = Histogram(
            "steer_time_to_first_sentence_seconds",
            "Chat: from a child's turn arriving (tagging, policy, prefill, gate, decoding, guard) to the first "
            "text event after which the reply holds a whole sentence, or to the end of a reply without one",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.prefix_tokens = Counter(
            "steer_prompt_tokens", "Prompt tokens, by whether the prefix cache held them (reused) or not (computed), and "
            "tokens prefilled while idle ahead of a Chat's next turn (warmed)",
            ["model", "source"], registry=r,
        )
        self.gate_decisions = Counter(
            "steer_gate_decisions", "Top-3 gate decisions (skip = steering not applied)", ["model", "decision"],
            registry=r,
        )
        self.reinjections = Counter("steer_reinjections", "KL-triggered re-injections", ["model"], registry=r)
        self.guard_actions = Counter("steer_guard_actions", "replies the content guard withheld text from, by what it did then",
                                     ["model", "action"], registry=r)
        self.finished = Counter("steer_streams_finished", "Streams ended, by reason", ["model", "reason"], registry=r)
        self.refusals = Counter("steer_refusals", "Requests refused before generating, by reason", ["reason"], registry=r)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (port 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)
