"""File work beside the model: the next dialogues' inputs read ahead and finished dialogues written behind,
each on one background thread, so that a run's model steps do not wait for image decoding, PNG encoding or
fsync (which release the GIL, so they overlap with torch's work).

``ReadAhead`` prepares items in input order on its thread, at most ``depth`` ahead of the consumer, which
takes them in the same order. ``WriteBehind`` calls its function on each item put, in order, on its thread,
at most ``depth`` items behind. An exception raised in either thread is raised again, the same object
(same message, same exit code), in the caller's thread: by ``take`` for the item that raised it, by the
next ``put`` or by ``close`` for the writer. Both are context managers that stop their thread on exit.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")

# How often a blocked background thread looks whether it was told to stop.
_POLL_S = 0.1
_END = object()


class ReadAhead(Generic[Item, Prepared]):
    """``prepare`` of each of ``items`` on a background thread, ``depth`` ahead; ``take`` hands them over."""

    def __init__(self, items: Iterable[Item], prepare: Callable[[Item], Prepared], depth: int):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items), prepare), name="read-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self, items: Iterable[Item], prepare: Callable[[Item], Prepared]) -> None:
        for item in items:
            try:
                entry = (item, prepare(item), None)
            except BaseException as error:  # noqa: BLE001 - raised again by take(), in the consumer's thread
                entry = (item, None, error)
            while not self._stop.is_set():
                try:
                    self._ready.put(entry, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def take(self, item: Item) -> Prepared:
        """The prepared ``item`` (the next one in input order), or the exception its ``prepare`` raised."""
        prepared_item, prepared, error = self._ready.get()
        if prepared_item is not item:
            raise RuntimeError("ReadAhead.take must follow the order of the items")
        if error is not None:
            raise error
        return prepared

    def close(self) -> None:
        """Stop the thread (items prepared but not taken are dropped)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[Item, Prepared]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class WriteBehind(Generic[Item]):
    """``write`` of each item ``put``, in order, on a background thread, at most ``depth`` items behind."""

    def __init__(self, write: Callable[[Item], Any], depth: int):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._pending: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name="write-behind", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[Item], Any]) -> None:
        while True:
            item = self._pending.get()
            if item is _END:
                return
            # After a failure the rest is taken but not written, so a put() never blocks on a dead writer.
            if self._error is None:
                try:
                    write(item)
                except BaseException as error:  # noqa: BLE001 - raised again by put()/close(), in the caller's thread
                    self._error = error

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: Item) -> None:
        """Queue ``item`` (waits while ``depth`` items are queued); raises an earlier write's exception."""
        self._raise_failure()
        self._pending.put(item)

    def close(self) -> None:
        """Write everything queued, stop the thread and raise the first write's exception, if any."""
        if self._thread.is_alive():
            self._pending.put(_END)
            self._thread.join()
        self._raise_failure()

    def __enter__(self) -> WriteBehind[Item]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing (an error, or Ctrl-C): finish the writes queued so far, so the dialogues finished
        # before are kept, and let the first exception go on.
        with contextlib.suppress(BaseException):
            self.close()
