"""One long-lived thread that runs all of a backend's work. MLX streams are thread-local (since
MLX 0.31.2): arrays and streams made on one thread cannot be used from a fresh one, so every MLX
call is marshalled to the thread that loaded the model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future


class EngineThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, args, kwargs, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller, re-raised there
                    future.set_exception(e)

    def submit(self, fn, *args, **kwargs) -> Future:
        """Queue fn for the engine thread; the future holds its result (or its exception)."""
        future: Future = Future()
        self._jobs.put((fn, args, kwargs, future))
        return future

    def call(self, fn, *args, **kwargs):
        """Run fn on the engine thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def iterate(self, iterator: Iterator) -> Iterator:
        """Advance `iterator` on the engine thread, yielding its items here."""
        done = object()
        while (item := self.call(next, iterator, done)) is not done:
            yield item
