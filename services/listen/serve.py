"""`steer listen`: read the pairs, open the answers store, serve the page until interrupted."""

from pathlib import Path

from werkzeug.serving import make_server

from .answers import AnswerStore
from .app import create_app
from .pairs import read_pairs
from .voice import Voice


def serve(pairs_path: Path, db: Path, voice: Voice, host: str = "127.0.0.1", port: int = 8765) -> int:
    pairs = read_pairs(pairs_path)  # a bad file fails here, before anything listens
    store = AnswerStore(db)
    server = make_server(host, port, create_app(pairs, store, voice), threaded=True)
    print(f"listening page on http://{host}:{server.server_port}/ ({len(pairs)} pairs from {pairs_path}); "
          f"answers in {db}; results at /results. Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
