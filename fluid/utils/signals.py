"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) for runs that are not Lightning's: a
signal that arrives while work can stop cleanly at its next round asks it to (the round in
flight finishes, what was measured is written, marked ``terminated``); anywhere else, or a
second signal, stops at once with :class:`Terminated`. The process then exits 128 + the signal
(143 for SIGTERM, 130 for SIGINT), like ``fluid.train``."""

from __future__ import annotations

import signal
import threading


class Terminated(Exception):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """``with GracefulStop() as stop:`` handlers for SIGTERM and SIGINT (main thread only);
    ``with stop.rounds():`` marks work that checks ``stop.requested`` between rounds."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._in_rounds = False
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (first and self._in_rounds):
            raise Terminated(signum)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def rounds(self):
        stop = self

        class _Rounds:
            def __enter__(self):
                stop._in_rounds = True
                if stop.requested:  # it came before the rounds began
                    raise Terminated(stop.signum)

            def __exit__(self, *exc):
                stop._in_rounds = False

        return _Rounds()
