"""The stream's monitors on their own: the KL monitor on scripted logits, the content guard's
monitor on scripted text with the real guard. No language model is involved."""

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from generator.events import KlSample, Reinjection
from generator.job import KlConfig
from generator.monitors import GUARD_MAX_HELD, GuardMonitor, KlMonitor, SetAlpha, Withhold, kl_divergence
from steering.guard import ThemeGuard, load_guard

SAME = torch.tensor([2.0, 1.0, 0.5, -1.0])  # steered and unsteered alike: KL 0, the steering has faded
APART = torch.tensor([-3.0, 4.0, 0.0, 1.0])  # KL well above any threshold


def _run(monitor: KlMonitor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[SetAlpha | None]:
    actions = []
    for index, (steered, unsteered) in enumerate(pairs):
        actions.append(monitor.observe(index, steered, unsteered, monitor.alpha))
    return actions


def test_a_faded_window_reinjects_for_a_window_then_returns_to_the_base_alpha() -> None:
    events: list = []
    m = KlMonitor(KlConfig(enabled=True, window=4, threshold=0.05, alpha_step=2.0, every=2), 6.0, 9.0, events.append)
    actions = _run(m, [(SAME, SAME)] * 8)
    assert actions[:3] == [None] * 3  # the window is not full yet
    assert actions[3] == SetAlpha(8.0, reinjection=True)
    assert actions[4:7] == [None] * 3  # re-injected: the window refills
    # At the end of the re-injection window alpha returns to 6, and the still-faded window
    # re-injects at once: the last action is what holds.
    assert actions[7] == SetAlpha(8.0, reinjection=True) and m.alpha == 8.0
    assert [e.token_index for e in events if isinstance(e, KlSample)] == [0, 2, 4, 6]
    assert [(e.alpha_before, e.alpha_after) for e in events if isinstance(e, Reinjection)] == [(6.0, 8.0), (6.0, 8.0)]
    assert kl_divergence(SAME, SAME) == pytest.approx(0.0, abs=1e-7)


def test_reinjection_never_passes_the_ceiling_and_keeps_the_direction() -> None:
    config = KlConfig(enabled=True, window=2, threshold=0.05, alpha_step=2.0)
    capped = KlMonitor(config, 8.5, 9.0, lambda e: None)
    assert _run(capped, [(SAME, SAME)] * 2)[1] == SetAlpha(9.0, reinjection=True)
    at_ceiling = KlMonitor(config, 9.0, 9.0, lambda e: None)
    assert _run(at_ceiling, [(SAME, SAME)] * 6) == [None] * 6
    away = KlMonitor(config, -6.0, 9.0, lambda e: None)
    assert _run(away, [(SAME, SAME)] * 2)[1] == SetAlpha(-8.0, reinjection=True)


def test_steering_that_holds_is_left_alone() -> None:
    m = KlMonitor(KlConfig(enabled=True, window=3, threshold=0.05), 6.0, 9.0, lambda e: None)
    assert kl_divergence(APART, SAME) > 1.0
    assert _run(m, [(APART, SAME)] * 10) == [None] * 10 and m.alpha == 6.0


# ---- the content guard ---------------------------------------------------------------

FLAGGED = "Everyone would be better off without you."


@pytest.fixture(scope="module")
def guard(paths) -> ThemeGuard:
    g = load_guard(paths.guard)
    assert g.check(FLAGGED).flagged and not g.check("Cats like to sleep in the sun.").flagged
    return g


@pytest.fixture(scope="module")
def checks():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def _monitor(guard: ThemeGuard, pool) -> tuple[GuardMonitor, list[str]]:
    """A monitor and the list its released text lands in."""
    released: list[str] = []
    return GuardMonitor(guard, pool, released.append), released


def _settle(m: GuardMonitor, released: list[str]) -> tuple[list[str], Withhold | None]:
    """Poll until nothing waits for a check; what was released, and the flagged sentence."""
    for _ in range(600):
        flagged = m.poll()
        if flagged or m.idle:
            return list(released), flagged
        time.sleep(0.05)
    raise TimeoutError("the guard's checks did not finish")


def _state(n: int):
    return lambda: torch.tensor([n])


def test_text_waits_for_its_sentence_then_goes_out_in_order(guard, checks) -> None:
    m, released = _monitor(guard, checks)
    m.push("Cats like", 2, _state(2))
    assert m.poll() is None and m.idle and m.held == "Cats like"
    m.push(" to sleep in the sun.", 7, _state(7))
    m.push(" They purr", 9, _state(9))
    assert _settle(m, released) == (["Cats like to sleep in the sun."], None)
    assert (m.sent, m.sent_tokens, m.held) == ("Cats like to sleep in the sun.", 7, " They purr")
    m.push(" softly", 10, _state(10), final=True)  # the reply's end sends an unfinished sentence too
    assert _settle(m, released) == (["Cats like to sleep in the sun.", " They purr softly"], None)
    assert m.sent_tokens == 10


def test_a_clean_sentence_goes_out_when_its_check_ends_without_waiting_for_a_poll(guard, checks) -> None:
    """Released from the checks' thread: a child hears it without waiting for the engine's next step."""
    m, released = _monitor(guard, checks)
    m.push("Cats like to sleep in the sun.", 7, _state(7))
    for _ in range(600):
        if released:
            break
        time.sleep(0.05)
    assert released == ["Cats like to sleep in the sun."] and m.idle  # no poll was made


def test_a_flagged_sentence_stops_everything_after_it(guard, checks) -> None:
    m, released = _monitor(guard, checks)
    m.push("Cats like to sleep in the sun.", 7, _state(7))
    m.push(" " + FLAGGED, 15, _state(15))
    m.push(" Dogs like to run in the park.", 22, _state(22))
    cleared, flagged = _settle(m, released)
    assert cleared == ["Cats like to sleep in the sun."]
    assert flagged is not None and flagged.themes and flagged.chars == len(" " + FLAGGED)
    # Go on from the end of the sent text, with the sampler's state at the flagged sentence's end.
    assert (flagged.from_token, flagged.sent, int(flagged.rng)) == (7, "Cats like to sleep in the sun.", 15)
    assert m.idle and m.held == ""  # the sentence after it is dropped, never checked
    m.push(" Dogs like to run in the park.", 9, _state(9))  # the reply goes on from the text sent
    assert _settle(m, released) == (["Cats like to sleep in the sun.", " Dogs like to run in the park."], None)


def test_a_run_on_is_checked_at_the_length_limit(guard, checks) -> None:
    m, released = _monitor(guard, checks)
    m.push("and then " * (GUARD_MAX_HELD // 9 + 1), 60, _state(60))
    assert not m.idle
    cleared, flagged = _settle(m, released)
    assert len(cleared) == 1 or flagged is not None  # checked (a loop may well be flagged), not held forever


def test_a_slow_check_holds_its_text_and_nothing_else(guard) -> None:
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(release.wait, 60)  # the check's worker is busy until released
        m, released = _monitor(guard, pool)
        m.push("Cats like to sleep in the sun.", 7, _state(7))
        assert m.poll() is None and not m.idle and released == []
        release.set()
        assert _settle(m, released) == (["Cats like to sleep in the sun."], None)


def test_nothing_goes_out_after_the_reply_has_ended(guard) -> None:
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(release.wait, 60)
        m, released = _monitor(guard, pool)
        m.push("Cats like to sleep in the sun.", 7, _state(7))
        m.close()  # the stream ended (cancelled, say) while the sentence waited for its check
        release.set()
    assert released == [] and m.idle  # the pool has shut down: every check has run


def test_a_failed_check_fails_the_stream_on_the_engine_s_thread(guard, checks) -> None:
    assert guard.harm is not None
    damaged = dataclasses.replace(guard.harm, feature_mean=np.zeros(7, dtype=np.float32))  # of the wrong width
    broken = dataclasses.replace(guard, harm=damaged)  # its check raises
    m, released = _monitor(broken, checks)
    m.push("Cats like to sleep in the sun.", 7, _state(7))
    for _ in range(600):
        if m.checking is None:
            break
        time.sleep(0.05)
    with pytest.raises(ValueError, match="broadcast"):
        m.poll()
    assert released == []
