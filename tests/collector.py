"""Collects what an engine job emits, for the engine tests."""

import threading

from generator.events import Event, Failed, Finished, Guarded, TextDelta


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.first_text = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, TextDelta):
            self.first_text.set()
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def guarded(self) -> list[Guarded]:
        return [e for e in self.events if isinstance(e, Guarded)]

    @property
    def finished(self) -> Finished:
        return next(e for e in self.events if isinstance(e, Finished))

    @property
    def failed(self) -> Failed | None:
        return next((e for e in self.events if isinstance(e, Failed)), None)
