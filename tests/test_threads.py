"""steering.threads: a call on a thread that ends with it, and single-threaded helpers."""

import threading

import pytest
import torch

from steering.threads import in_passing_thread, single_threaded


def test_in_passing_thread_returns_raises_and_ends() -> None:
    seen: list[tuple[threading.Thread, int]] = []

    def work(x: int) -> int:
        seen.append((threading.current_thread(), torch.get_num_threads()))
        return x * 2

    assert in_passing_thread(work, 21, threads=1) == 42
    thread, threads = seen[0]
    assert thread is not threading.current_thread() and not thread.is_alive() and threads == 1

    def fail() -> None:
        raise ValueError("what to fix")

    with pytest.raises(ValueError, match="what to fix"):
        in_passing_thread(fail)


def test_single_threaded_holds_for_its_thread_only() -> None:
    mine = torch.get_num_threads()
    counts: list[int] = []

    def helper() -> None:
        single_threaded()
        counts.append(torch.get_num_threads())

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert counts == [1] and torch.get_num_threads() == mine
