"""The bridge between asyncio and the engine: one thread owns the Engine, the event loop talks to it by messages.

The engine is synchronous and not thread-safe, so a single worker thread calls it. The
event loop's side (`submit`, `abort`) only puts commands on a thread-safe queue; the
worker takes them between steps, calls `step()` while the engine has work and blocks on
the queue when it has none. Each step's events go back to the loop with
`call_soon_threadsafe`, into the asyncio.Queue of their request:

    loop:    submit(id, request) -> asyncio.Queue    abort(id)
               |  commands (queue.SimpleQueue)          ^ events, errors (call_soon_threadsafe)
    worker:    engine.add / engine.abort / engine.step -+

A request's queue receives its Events, then nothing more once all its n completions have
finished. A request that ends otherwise gets a last item saying why: ABORTED (`abort`), the
exception of `engine.add` (a request the engine refuses) or of a failed `engine.step`, or
ShuttingDown (the runner stopped first).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from mistura.errors import MisturaError
from mistura.serve.engine import Engine, EngineStats, Event, Request

log = logging.getLogger(__name__)

ABORTED = object()  # the last item of an aborted request's queue
RATE_WINDOW_S = 10.0  # tokens_per_second averages over this window


class QueueFull(Exception):
    """Submitting while `max_queue` requests already wait for a place in the running batch."""


class ShuttingDown(Exception):
    """The request was still running when the server stopped."""


@dataclass
class _Live:
    """A submitted request, as the event loop tracks it."""

    queue: asyncio.Queue
    n: int
    finished: int = 0


class Runner:
    """Runs an Engine on its own thread for an asyncio event loop; `start` it in the loop, `stop` it at the end.

    At most `max_queue` requests wait (submitted but not yet admitted to the engine's running
    batch, or preempted): `submit` raises QueueFull beyond that.
    """

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.stats: EngineStats = engine.stats()  # the worker's latest snapshot
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, _Live] = {}  # event loop only
        self.unadded = 0  # submitted, not yet handed to the engine
        self.lock = threading.Lock()  # guards unadded and samples
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), self.stats.generated_tokens)])
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._work, name="mistura-engine", daemon=True)

    # The event loop's side.

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the worker after its current step; requests still running get ShuttingDown."""
        self.commands.put(("stop",))
        self.thread.join(timeout)
        for request_id in list(self.live):
            self._end(request_id, ShuttingDown("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the running batch: not yet handed to the engine, or queued in it."""
        with self.lock:
            return self.unadded + self.stats.waiting

    def submit(self, request_id: str, request: Request) -> asyncio.Queue:
        """Queue a request; its Events (or the engine's error) will arrive in the returned queue."""
        if self.waiting >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        with self.lock:
            self.unadded += 1
        self.live[request_id] = _Live(asyncio.Queue(), request.n)
        self.commands.put(("add", request_id, request))
        return self.live[request_id].queue

    def abort(self, request_id: str) -> None:
        """Drop a request that has not finished (its KV blocks are freed at the next step); others are ignored."""
        if request_id in self.live:
            self._end(request_id, ABORTED)
            self.commands.put(("abort", request_id))

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds (or since the start, if shorter)."""
        now = time.monotonic()
        with self.lock:
            then, before = next(
                ((t, g) for t, g in reversed(self.samples) if t <= now - RATE_WINDOW_S), self.samples[0]
            )
            generated = self.stats.generated_tokens
        return (generated - before) / max(now - then, 1e-9)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            live = self.live.get(event.request_id)
            if live is None:  # aborted: the engine had stepped before it saw the abort
                continue
            live.queue.put_nowait(event)
            if event.finish_reason is not None:
                live.finished += 1
                if live.finished == live.n:
                    del self.live[event.request_id]

    def _end(self, request_id: str, last: object) -> None:
        """Hand a request its last item (ABORTED or an exception) and forget it."""
        self.live.pop(request_id).queue.put_nowait(last)

    def _fail(self, request_id: str, error: Exception) -> None:
        if request_id in self.live:
            self._end(request_id, error)

    def _fail_all(self, error: Exception) -> None:
        """An engine step failed: every request still running ends with the error, and is aborted in the engine."""
        for request_id in list(self.live):
            self._end(request_id, error)
            self.commands.put(("abort", request_id))

    # The worker's side.

    def _work(self) -> None:
        failed = False  # the last step failed: wait for the aborts the event loop sends before stepping again
        while True:
            for command in self._take(block=failed or not self.engine.has_work):
                if command[0] == "stop":
                    return
                self._apply(command)
            events = self._step() if self.engine.has_work else []
            failed = events is None
            self._publish(events or [])

    def _take(self, block: bool) -> list[tuple]:
        """The commands waiting now; when `block`, at least one (the engine is idle)."""
        commands = [self.commands.get()] if block else []
        while not self.commands.empty():
            commands.append(self.commands.get_nowait())
        return commands

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return
        _, request_id, request = command
        try:
            self.engine.add(request_id, request)
        except Exception as err:  # the engine refused the request: its error is the client's answer
            if not isinstance(err, MisturaError):
                log.exception("the engine failed to add request %s", request_id)
            self.loop.call_soon_threadsafe(self._fail, request_id, err)
        finally:
            with self.lock:
                self.unadded -= 1

    def _step(self) -> list[Event] | None:
        """The engine's next events; None when the step failed (its requests are ended with the error)."""
        try:
            return self.engine.step()
        except Exception as err:
            log.exception("the engine failed a step; the requests it was running end with the error")
            self.loop.call_soon_threadsafe(self._fail_all, err)
            return None

    def _publish(self, events: list[Event]) -> None:
        """Snapshot the engine's stats and hand the events to the event loop."""
        stats = self.engine.stats()
        with self.lock:
            self.stats = stats
            self.samples.append((time.monotonic(), stats.generated_tokens))
            while len(self.samples) > 2 and self.samples[1][0] <= time.monotonic() - 2 * RATE_WINDOW_S:
                self.samples.popleft()
        if events:
            self.loop.call_soon_threadsafe(self._deliver, events)
