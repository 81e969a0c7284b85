"""Which threads run torch's CPU kernels, so that OpenMP keeps its workers spinning.

torch's CPU kernels run on OpenMP (libgomp). Each thread that runs a parallel kernel gets a
team of worker threads of its own, which lives as long as that thread. When a process holds
more of them than there are cores, libgomp stops spinning between kernels and puts its
workers to sleep, so each of the hundreds of small kernels in a decoding step pays a wake-up.
On 2 cores the int8 model decoded at half speed on the engine's thread (9.5 against 19.5
tokens/s) while the thread that had loaded the model still held its team. So a service loads
its models on a thread that ends (its team ends with it), the engine's thread is the one with
a full team, and helper threads that run small kernels (the guard's embedding) run them on
one thread, which needs no team.
"""

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args: object, threads: int | None = None) -> T:
    """fn(*args) on a new thread that ends when it returns, with `threads` intra-op threads
    (default: the caller's); its result, or its exception raised here."""
    count, out, error = threads or torch.get_num_threads(), [], []

    def run() -> None:
        torch.set_num_threads(count)
        try:
            out.append(fn(*args))
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"passing-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out[0]


def single_threaded() -> None:
    """Run this thread's torch kernels on it alone (a thread pool's initializer): no team."""
    torch.set_num_threads(1)
