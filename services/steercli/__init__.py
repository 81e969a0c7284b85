"""The `steer` console script: the steering core's commands plus the ones that talk to the
services (`tag`, `chat`). Kept apart so the core never imports gRPC or the services."""

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from steering import cli as core


def cmd_tag(args: argparse.Namespace) -> int:
    from tagger.classifier import tag_jsonl

    if args.device:
        os.environ["STEER_EMBED_DEVICE"] = args.device
    tag_jsonl(Path(args.jsonl), sys.stdout)
    return 0


async def _chat(address: str, token: str | None, max_tokens: int) -> None:
    from generator.client import BlipClient
    from generator.tagger_client import EMOTION_NAMES
    print("Talk to Blip (empty line or Ctrl-D to stop).", flush=True)
    async with BlipClient(address, token=token) as client:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                break
            if not line.strip():
                break
            async for event in client.chat([line], max_tokens=max_tokens):
                kind = event.WhichOneof("event")
                if kind == "tag":
                    print(f"  [tag {EMOTION_NAMES[event.tag.label]} {event.tag.confidence:.2f}]", end="")
                elif kind == "concept":
                    print(f" [concept {event.concept or 'none'}]\nblip> ", end="", flush=True)
                elif event.reply.WhichOneof("event") == "text":
                    print(event.reply.text, end="", flush=True)
                elif event.reply.WhichOneof("event") == "notice":
                    print(f"\n  [{event.reply.notice.message}]", end="")
            print()


def cmd_chat(args: argparse.Namespace) -> int:
    import grpc

    token = os.environ.get(args.token_env) if args.token_env else None
    try:
        asyncio.run(_chat(args.address, token, args.max_tokens))
    except grpc.aio.AioRpcError as exc:
        print(f"steer: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = core.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("tag", help="tag child turns with the tagger's classifier, one JSON line each")
    p.add_argument("--jsonl", required=True, help='input file, one {"text": ..., "context": [...]} per line')
    p.add_argument("--device", help="the sentence embedder's device (default cpu, or STEER_EMBED_DEVICE)")
    p.set_defaults(func=cmd_tag)
    p = sub.add_parser("chat", help="talk to Blip through a running generator (interactive)")
    p.add_argument("--address", default="127.0.0.1:50052", help="generator address (default 127.0.0.1:50052)")
    p.add_argument("--token-env", help="environment variable holding the shared token")
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return core.main(argv, parser=build_parser())
