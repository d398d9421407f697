"""The serving engine: one thread owns the model and runs the batched decoding loop.

Requests are queued by the web server's threads; between two forwards the engine lets queued
requests join the running batch (one prefill for all that arrived, :class:`RunningBatch`), drops
cancelled ones (a client that went away), runs one forward of every active row, and reports each
row's newly committed tokens to its request (``on_event``, called on the engine thread). A request
whose prefill or report fails is failed alone; a forward that fails fails the rows it carried and
the engine goes on with an empty batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fluid.decoding.running import RunningBatch
from fluid.decoding.state import StopRule

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class Request:
    """One request in the engine: its prompt, its own stop rule and where its events go.

    ``on_event(kind, payload)``: ``("tokens", [ids])`` after a forward that committed some,
    ``("done", RowStats)`` once, or ``("error", message)`` once."""

    prompt: list[int]
    rule: StopRule
    on_event: Callable[[str, object], None]
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    row: int | None = None
    sent: int = 0
    cancelled: bool = False
    closed: bool = False


class Engine:
    def __init__(self, decoder, cfg=None, max_rows: int = 16, max_queue: int = 256, metrics=None):
        self.rb = RunningBatch(decoder, cfg)
        self.max_rows, self.max_queue = max_rows, max_queue
        self.metrics = metrics
        self._queue: collections.deque[Request] = collections.deque()
        self._live: dict[int, Request] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fluid-engine", daemon=True)
        self.peak_rows = 0

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, req: Request) -> Request:
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise QueueFull("the engine is not running (shutting down, or it failed: see the server log)")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (serve max_queue={self.max_queue})")
            self._queue.append(req)
            self._gauges()
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: the row leaves the batch before the next forward."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still queued or running and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_rows(self) -> int:
        return self.rb.size

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:  # an engine bug: nobody would read the queue again, so fail everything and stop
            log.exception("the engine failed; the server no longer accepts requests")
            with self._cv:
                self._stopping = True
        for r in list(self._live.values()) + list(self._queue):
            self._emit(r, "error", "the server is shutting down" if self._stopping else "the engine failed")
        self._live.clear()
        self._queue.clear()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self.rb.size and not self._live:
                    self._cv.wait()
                if self._stopping:
                    break
                room = self.max_rows - self.rb.size
                new = []
                while self._queue and len(new) < room:
                    r = self._queue.popleft()
                    if r.cancelled:
                        self._emit(r, "error", "cancelled")
                    else:
                        new.append(r)
                cancelled = [r for r in self._live.values() if r.cancelled]
            for r in cancelled:
                self._finish(r, None)
            if new:
                self._admit(new)
            if self.rb.size:
                self._forward()
            self._report()
            self._gauges()

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill ``reqs`` together; if that fails, one by one, failing only those that fail alone."""
        try:
            rows = self.rb.add([r.prompt for r in reqs], [r.rule for r in reqs])
        except Exception:
            if len(reqs) > 1:
                for r in reqs:
                    self._admit([r])
                return
            log.exception("prefill failed")
            self._emit(reqs[0], "error", "the prompt could not be prefilled")
            return
        for r, row in zip(reqs, rows):
            r.row = row
            self._live[row] = r
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in reqs))

    def _forward(self) -> None:
        n = self.rb.size
        self.peak_rows = max(self.peak_rows, n)
        try:
            self.rb.step()
        except Exception:
            log.exception("a forward failed; the %d requests in the batch are failed", len(self._live))
            for row in list(self._live):  # every row in the batch shared it (some may have left it mid-step)
                self._emit(self._live.pop(row), "error", "decoding failed")
            self.rb = RunningBatch(self.rb.decoder, self.rb.cfg)  # an empty batch, the same settings
            return
        if self.metrics:
            self.metrics.forward(n)

    def _report(self) -> None:
        """Each live request gets its newly committed tokens; finished rows leave."""
        active = set(self.rb.active)
        now = time.perf_counter()
        for row, req in list(self._live.items()):
            st = self.rb.stats.get(row)
            if st is None:
                continue
            new = st.tokens[req.sent:]
            if new:
                if req.first_token is None:
                    req.first_token = now
                    if self.metrics:
                        self.metrics.ttft.observe(now - req.submitted)
                req.sent = len(st.tokens)
                if self.metrics:
                    self.metrics.tokens.inc(len(new))
                if not self._emit(req, "tokens", new):
                    self._finish(req, None)
                    continue
            if row not in active:
                self._finish(req, st)

    def _finish(self, req: Request, stats) -> None:
        """``req`` leaves: done (``stats``) or cancelled (None)."""
        if req.row is not None:
            self._live.pop(req.row, None)
            if req.row in self.rb.stats:
                self.rb.pop(req.row)
        if stats is not None:
            if self.metrics:
                self.metrics.latency.observe(time.perf_counter() - req.submitted)
            self._emit(req, "done", stats)
        else:
            self._emit(req, "error", "cancelled")

    def _emit(self, req: Request, kind: str, payload) -> bool:
        """Deliver an event; False (and the request cancelled) if its receiver is gone."""
        if req.closed:
            return False
        if kind in ("done", "error"):
            req.closed = True
        try:
            req.on_event(kind, payload)
            return True
        except Exception:
            log.warning("a request's receiver failed; the request is cancelled", exc_info=True)
            req.cancelled = True
            return False

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.active_rows.set(self.rb.size)
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.peak_rows.set(self.peak_rows)
