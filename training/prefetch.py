"""The next batch, drawn and tokenized on a background thread during the current step.

Tokenizing a large batch costs the host tens to hundreds of milliseconds in which a GPU
would otherwise wait. The HF fast tokenizers release the GIL while they work, so one
helper thread overlaps that with the step's forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``next(prefetcher)`` returns ``produce()``'s next result, while the one after it is
    already being produced on a thread.

    ``produce`` runs on one thread only, one call at a time and in order, so a stateful
    producer (a sampler) sees the same sequence of calls as without prefetching; the
    results are identical, only their timing differs. An exception raised by ``produce``
    surfaces from the ``next`` that would have returned its result. With ``enabled=False``
    every result is produced on the caller's thread when asked for. A prefetcher works
    ahead by one: what the last ``next`` left pending is discarded by :meth:`close`.
    """

    def __init__(self, produce: Callable[[], T], enabled: bool = True) -> None:
        self._produce = produce
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        )
        self._pending: Future[T] | None = None

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._pool is None:
            return self._produce()
        current = self._pending or self._pool.submit(self._produce)
        self._pending = self._pool.submit(self._produce)
        return current.result()

    def close(self) -> None:
        """Stops the thread, waiting for a result being produced (not for one queued)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
