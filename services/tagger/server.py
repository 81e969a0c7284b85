"""Run the tagger service: `python -m tagger.server --help`."""

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from serving.server import RunningServer, ServerSettings, start_server
from steering.errors import SteeringError

from .classifier import INFERENCE_THREADS, TaggerModel, default_model_path
from .servicer import SERVICE_NAME, TaggerServicer, add_to_server

log = logging.getLogger(__name__)


async def start_tagger(settings: ServerSettings) -> tuple[RunningServer, TaggerServicer]:
    """Bind and start with no model yet: health NOT_SERVING, calls answer UNAVAILABLE."""
    servicer = TaggerServicer()
    running = await start_server(settings, lambda server: add_to_server(servicer, server), [SERVICE_NAME])
    return running, servicer


def _load_warm(path: Path) -> TaggerModel:
    model = TaggerModel.load(path)
    model.predict("hello Blip")  # loads the embedder now, not on the first child's turn
    return model


async def attach_model(running: RunningServer, servicer: TaggerServicer, model_path: Path | None = None) -> None:
    """Load the model off the event loop, hand it to the servicer, then say SERVING."""
    path = model_path or default_model_path()
    model = await asyncio.to_thread(_load_warm, path)
    servicer.attach(model)
    await running.set_serving(True)
    log.info("tagger model %s loaded (threshold %.2f); serving", path.name, model.threshold)


async def serve(settings: ServerSettings, model_path: Path | None = None) -> RunningServer:
    """Start the server (NOT_SERVING), load the model, then SERVING. Stop with `running.stop()`."""
    running, servicer = await start_tagger(settings)
    try:
        await attach_model(running, servicer, model_path)
    except BaseException:
        await running.stop()
        raise
    return running


def _parse(argv: Sequence[str] | None) -> tuple[ServerSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m tagger.server", description="Tag a child's turns with an emotion, over gRPC."
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: no data leaves the house)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--model", type=Path, help="model file (default: the checked-in one)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    p.add_argument(
        "--token-env", metavar="NAME", help="environment variable holding the shared token (never on the command line)"
    )
    p.add_argument("--device", help="the sentence embedder's device: cpu (default, or STEER_EMBED_DEVICE), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=INFERENCE_THREADS, help="torch threads for tagging (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.parse_args(argv)
    token = os.environ.get(a.token_env) if a.token_env else None
    if a.token_env and not token:
        p.error(f"environment variable {a.token_env} is not set or empty")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("TLS needs both --tls-cert and --tls-key")
    settings = ServerSettings(host=a.host, port=a.port, tls_cert=a.tls_cert, tls_key=a.tls_key, token=token)
    return settings, a


async def _run_until_signal(settings: ServerSettings, model_path: Path | None) -> None:
    running = await serve(settings, model_path)
    print(f"tagger serving on {settings.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await running.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings, args = _parse(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # At INFO sentence-transformers draws a progress bar for every tagged turn.
    logging.getLogger("sentence_transformers").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    import torch  # thread counts are process-wide: only the serving process sets them, never serve()

    torch.set_num_threads(max(1, args.threads))
    if args.device:  # process-wide like the threads: the classifier and the scorer read it
        os.environ["STEER_EMBED_DEVICE"] = args.device
    try:
        asyncio.run(_run_until_signal(settings, args.model))
    except (SteeringError, OSError, ValueError) as exc:  # start-up errors are one line, not a traceback
        print(f"tagger: error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
