"""Shared fixtures. Behaviour tests use the real packaged SmolLM2; structural tests use tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (and for the processes a
    # test starts) instead of four threads fighting over two cores.
    os.environ["OMP_NUM_THREADS"] = "1"

import ipaddress
import socket

import pytest
import torch

from steering.loading import LoadedModel, load_model
from steering.registry import load_registry
from steering.settings import Paths, paths_from_env

SMOLLM = "smollm2-135m-instruct"


# The files that take a minute or more, started first so that `make test`'s two workers
# (--dist loadfile) finish together instead of one waiting on a long file picked up last.
SLOW_FILES = ("test_faults.py", "test_bad_input.py", "test_load.py", "test_steering_effect.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="session")
def paths() -> Paths:
    return paths_from_env()


@pytest.fixture(scope="session")
def smollm(paths: Paths) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(load_registry(paths.registry).get(SMOLLM), paths.cache, device="cpu")


@pytest.fixture(scope="session")
def figures() -> dict:
    """Figures the reliability suites measure; `make reliability` sets RELIABILITY_OUT to keep them."""
    found: dict = {}
    yield found
    out = os.environ.get("RELIABILITY_OUT")
    if out and found:
        import json
        from pathlib import Path

        path = Path(out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(found)
        path.write_text(json.dumps(merged, indent=2) + "\n")


# ---- "no data leaves the house": every test runs behind a socket guard -------------------

OUTBOUND_ATTEMPTS: list[str] = []
_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _own_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


def _is_local(sock: socket.socket, address) -> bool:
    """Loopback, a Unix socket, or one of this machine's own interface addresses."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    host = address[0] if isinstance(address, tuple) else str(address)
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a host name: resolving it would already leave the house
    return ip.is_loopback or str(ip) in _own_addresses()


def _guarded(real):
    def connect(self, address):
        if not _is_local(self, address):
            OUTBOUND_ATTEMPTS.append(repr(address))
            raise ConnectionRefusedError(f"socket guard: outbound connection to {address!r} blocked in tests")
        return real(self, address)

    return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)


@pytest.fixture(autouse=True)
def no_outbound_connections():
    """Tests that expect the guard to fire clear what they caused; anything left fails the test
    that caused it (per test, so it holds in every worker process too)."""
    yield
    if OUTBOUND_ATTEMPTS:
        leaked = list(OUTBOUND_ATTEMPTS)
        OUTBOUND_ATTEMPTS.clear()
        pytest.fail(f"socket guard: outbound connections attempted: {leaked}")
