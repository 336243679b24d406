"""Background work the gateway can afford to lose: a bounded queue in front of a few daemon threads.

Shadow checks (re-asking the teacher about answers the student already gave) are a sample: when the
teacher is slower than the traffic, queueing every one of them grows memory without bound and turns a
shutdown into minutes of working off a backlog nobody waits for. So a full queue drops the new task
(``dropped`` counts them, ``/metrics`` shows the count), and ``shutdown(cancel_pending=True)`` drops what
is queued and waits a bounded time for the tasks already running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("protege.serve")


class BoundedPool:
    def __init__(self, workers: int = 2, maxsize: int = 256, name: str = "protege-background",
                 on_drop: Callable[[], None] | None = None):
        self.workers, self.maxsize = workers, maxsize
        self.dropped = 0
        self.on_drop = on_drop or (lambda: None)
        self._q: queue.Queue = queue.Queue(maxsize)
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args) -> bool:
        """Queue ``fn(*args)``; False (and counted as dropped) when the queue is full or the pool is closed."""
        if not self._closed:
            try:
                self._q.put_nowait((fn, args))
                return True
            except queue.Full:
                pass
        self._drop()
        return False

    def _drop(self) -> None:
        with self._lock:
            self.dropped += 1
        self.on_drop()

    def pending(self) -> int:
        return self._q.qsize()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                fn, args = item
                try:
                    fn(*args)
                except Exception:  # background work: log, never kill the worker
                    log.exception("background task failed")
            finally:
                self._q.task_done()

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop taking work. ``cancel_pending``: drop the queued tasks (counted) instead of running them.
        ``wait``: join the workers, for at most ``timeout`` seconds in all (they are daemon threads: a task
        still running past that does not keep the process alive)."""
        self._closed = True
        if cancel_pending:
            while True:
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    break
                self._q.task_done()
                self._drop()
        for _ in self._threads:
            self._q.put(None)  # after the queued tasks: with cancel_pending=False those run first
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
