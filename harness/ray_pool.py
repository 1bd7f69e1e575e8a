"""A pool of Ray actors that hands opaque work items to whichever actor is free.

Like ``ray.util.ActorPool``, it knows nothing of the work: the owner says how to start an actor
(``spawn``), how to check that one is ready (``ready``), how to run an item on one (``call``) and
what a failed item's result is (``failed``). On top of ``ActorPool`` it replaces an actor that
dies: the item it was running goes back to the front of the queue and a new actor sets up while
the others keep working; an item lost ``max_attempts`` times gets ``failed``'s result instead.
Its state outlives a call, so work put in one call can finish in a later one (pipelined runs).
"""
from __future__ import annotations

import sys
from collections import deque
from typing import Any, Callable


def lost_errors() -> tuple[type[BaseException], ...]:
    """The exceptions Ray raises when an actor dies or becomes unreachable."""
    import ray.exceptions as E
    return (E.RayActorError, E.WorkerCrashedError, E.OutOfMemoryError, E.NodeDiedError, E.ObjectLostError)


class ActorPool:
    """``size`` actors from ``spawn()``; ``put`` queues an item, ``step`` waits for one event.

    Args:
        spawn: starts one actor (an actor handle).
        ready: takes ``ray.get(actor.ready.remote())`` and raises if the actor failed to set up.
        call: ``call(actor, item)`` → an object ref whose value is ``(result, busy_seconds)``.
        failed: ``failed(item, message)`` → the result of an item lost ``max_attempts`` times.
        quiet: no line on stderr when an actor is lost.
    """

    def __init__(self, ray, size: int, spawn: Callable[[], Any], ready: Callable[[Any], Any],
                 call: Callable[[Any, Any], Any], failed: Callable[[Any, str], Any], max_attempts: int = 3,
                 quiet: bool = False):
        self.ray, self._spawn, self._ready, self._call, self._failed = ray, spawn, ready, call, failed
        self.max_attempts, self.quiet = max_attempts, quiet
        self.restarts, self.busy_s = 0, 0.0
        self.actors = [spawn() for _ in range(size)]
        self._items: dict[int, Any] = {}
        self._queue: deque = deque()        # (key, attempt) waiting for an idle actor
        self._running: dict = {}            # ref → (slot, key, attempt)
        self._starting: dict = {}           # ready ref of a replacement actor → slot
        self._idle: deque = deque(range(size))
        self._next_key = 0

    def wait_ready(self) -> list:
        """Wait until every actor has set up; the ``ready`` results in actor order."""
        try:
            return [self._ready(info) for info in self.ray.get([a.ready.remote() for a in self.actors])]
        except lost_errors() as e:
            raise RuntimeError(f"a Ray worker died while setting up the task: {e}") from None

    def put(self, item) -> int:
        """Queue ``item``; returns its key (the key ``step`` reports it under)."""
        key = self._next_key
        self._next_key += 1
        self._items[key] = item
        self._queue.append((key, 1))
        return key

    def run(self, items: list) -> list:
        """Every item's result, in item order (blocks until all are done)."""
        keys = [self.put(w) for w in items]
        want, got = set(keys), {}
        while want - got.keys():
            for key, res in self.step():
                got[key] = res
        return [got.pop(k) for k in keys]

    def step(self) -> list[tuple[int, Any]]:
        """Start queued items on idle actors, wait for one event, and return the items it
        finished (none when the event was a replacement actor becoming ready or a lost item
        going back to the queue)."""
        ray, lost = self.ray, lost_errors()
        self.dispatch()
        if not self._running and not self._starting:
            raise RuntimeError("no Ray worker is left to evaluate on")
        (ref,), _ = ray.wait(list(self._running) + list(self._starting), num_returns=1)
        if ref in self._starting:
            slot = self._starting.pop(ref)
            try:
                self._ready(ray.get(ref))
            except lost as e:
                raise RuntimeError(f"a replacement Ray worker died while setting up: {e}") from None
            self._idle.append(slot)
            return []
        slot, key, attempt = self._running.pop(ref)
        try:
            result, busy = ray.get(ref)
            self.busy_s += busy
        except lost as e:
            if not self.quiet:
                print(f"ray evaluator: worker {slot} lost ({type(e).__name__}); starting a new one and "
                      "handing its work out again", file=sys.stderr, flush=True)
            self._starting[self._replace(slot)] = slot
            if attempt < self.max_attempts:
                self._queue.appendleft((key, attempt + 1))
                return []
            result = self._failed(self._items[key], f"Ray worker lost {attempt} times on this work: {type(e).__name__}")
        else:
            self._idle.append(slot)
            self.dispatch()  # the freed actor starts on the next queued item before the caller moves on
        del self._items[key]
        return [(key, result)]

    def dispatch(self) -> None:
        """Start queued items on idle actors."""
        while self._idle and self._queue:
            slot, (key, attempt) = self._idle.popleft(), self._queue.popleft()
            self._running[self._call(self.actors[slot], self._items[key])] = (slot, key, attempt)

    def _replace(self, slot: int):
        """Start a fresh actor in ``slot`` (the old one is dead or killed); returns its ready ref."""
        try:
            self.ray.kill(self.actors[slot])
        except Exception:
            pass
        self.restarts += 1
        self.actors[slot] = self._spawn()
        return self.actors[slot].ready.remote()

    def close(self) -> None:
        """Kill every actor and forget the queued work (idempotent)."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already dead, or Ray already gone
                pass
        self.actors, self._starting, self._running, self._items = [], {}, {}, {}
        self._idle, self._queue = deque(), deque()
