"""Group commit: many concurrent callers, one transaction per batch.

Callers (threads or asyncio tasks) submit operations; writer threads drain the queue,
run up to ``batch_max`` operations in one store transaction, and hand each caller its
own result. Asyncio callers are woken with one ``call_soon_threadsafe`` per event loop
per batch, so the wake-up cost is paid per batch, not per operation.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from drip import errors
from drip.ledger.engine import orphan_voids

log = logging.getLogger("drip.ledger")

RunBatch = Callable[[list[Any]], list[Any]]

#: What every use of a ledger in a process forked after it was opened hears: the child
#: has none of its threads, and must not use the connections it inherited (SQLite's
#: and libpq's are the parent's too).
FORKED = "this ledger was opened in another process (before fork); open it in each process"
CLOSED = "the ledger is closed"


class _ForkAware(Protocol):
    def forked(self) -> None: ...


_FORK_AWARE: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def on_fork_in_child(obj: _ForkAware) -> None:
    """Have ``obj.forked()`` called in each child forked from this process while ``obj``
    lives (it is held weakly). Nothing is checked per operation: the child's objects
    learn of the fork once, right after it."""
    _FORK_AWARE.add(obj)


def _forked_child() -> None:
    for obj in list(_FORK_AWARE):
        try:
            obj.forked()
        except Exception:  # logged: the child must come up whatever one of them does
            log.exception("ledger: could not mark %r unusable after fork", obj)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked_child)


class LoopBound:
    """A per-event-loop batcher's hold on its loop: weak, since the batcher is the value
    of its store's dictionary keyed weakly by that loop (a strong reference would keep
    every loop, and batcher, that ever used the store)."""

    _loop: weakref.ref[asyncio.AbstractEventLoop]

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:  # pragma: no cover - a loop that is gone runs no code
            raise errors.StoreError("the event loop of this batch is gone")
        return loop


class _Item:
    __slots__ = ("future", "loop", "op")

    def __init__(self, op: Any, loop: asyncio.AbstractEventLoop | None, future: Any) -> None:
        self.op = op
        self.loop = loop
        self.future = future


def _resolve_async(pairs: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, value, failed in pairs:
        if future.done():  # the caller was cancelled; its operation still committed
            continue
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)


class GroupCommitter:
    """Coalesces submitted operations into batches run by ``workers`` writer threads."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        workers: int = 1,
        batch_max: int = 1024,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_interval_s: float = 1.0,
        name: str = "drip-writer",
        isolate: Callable[[Exception], bool] | None = None,
    ) -> None:
        self._run_batch = run_batch
        #: whether a batch that failed with this error is run again one operation at a
        #: time (a value the database refused fails its own operation, not its batch)
        self._isolate = isolate
        self._batch_max = batch_max
        self._housekeeping = housekeeping
        self._housekeeping_interval_s = housekeeping_interval_s
        self._queue: collections.deque[_Item] = collections.deque()
        #: per event loop, what this turn of the loop submitted (handed off at its end)
        self._loop_pending: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        self._cond = threading.Condition(threading.Lock())
        self._sleepers = 0
        #: set under ``_cond``: no item is queued once it is (``_push`` checks it there)
        self._closed = False
        self._closed_reason = CLOSED
        self._next_housekeeping = time.monotonic() + housekeeping_interval_s
        self._housekeeping_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()
        on_fork_in_child(self)

    def forked(self) -> None:
        """In a forked child (``os.register_at_fork``): the writer threads do not exist
        here, so nothing queued would ever run; every submission fails instead. The
        locks are new: a parent's thread may have held one at the fork."""
        self._cond = threading.Condition(threading.Lock())
        self._housekeeping_lock = threading.Lock()
        self._threads = []
        self._sleepers = 0
        self._closed = True
        self._closed_reason = FORKED
        # the parent's writers run what was queued; only the forking thread lives on
        # here, and an event loop it runs may be awaiting some of it
        stranded = [item for item in self._queue if item.loop is not None]
        self._queue.clear()
        error = errors.StoreError(FORKED)
        for item in stranded:
            with contextlib.suppress(Exception):  # a loop that is gone: nobody waits
                if not item.future.done():
                    item.future.set_exception(error)

    # --- submitting -------------------------------------------------------------------

    def _push(self, *items: _Item) -> None:
        with self._cond:
            # checked under the lock: close() sets it under the lock too, so an item is
            # either queued before the writers can see "closed and empty", or refused
            if self._closed:
                raise errors.StoreError(self._closed_reason)
            self._queue.extend(items)
            if self._sleepers:
                self._cond.notify()

    def submit_async(self, op: Any) -> asyncio.Future[Any]:
        """Queue ``op`` from inside a running event loop; await the returned future.

        What one turn of the loop submits reaches the writer together (one hand-off at
        the end of the turn), so a batch is not cut short by the first arrival.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._loop_pending.get(loop)
        if pending is None:
            pending = self._loop_pending[loop] = []
            loop.call_soon(self._hand_off, loop)
        pending.append(_Item(op, loop, future))
        return future

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        items = self._loop_pending.pop(loop, [])
        try:
            self._push(*items)
        except errors.StoreError as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)

    def submit(self, op: Any) -> Any:
        """Queue ``op`` and block this thread until its batch commits; return its result.

        A private hold whose waiter is interrupted meanwhile (``KeyboardInterrupt``, or
        whatever a signal handler raises) is voided once it lands: nobody else knows its
        id, so it would reserve the funds until its timeout."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._push(_Item(op, None, future))
        try:
            return future.result()
        except BaseException:
            if getattr(op, "private", False):
                future.add_done_callback(functools.partial(self._void_interrupted, op))
            raise

    def _void_interrupted(self, op: Any, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._void_orphans([(_Item(op, None, future), future.result())])

    def housekeep_soon(self) -> None:
        """Run the housekeeping at the writer thread's next turn, not at its interval."""
        with self._cond:
            self._next_housekeeping = 0.0
            self._cond.notify()

    # --- writing ----------------------------------------------------------------------

    def _loop(self) -> None:
        queue = self._queue
        while True:
            with self._cond:
                if not queue and not self._closed:
                    self._sleepers += 1
                    self._cond.wait(self._housekeeping_interval_s)
                    self._sleepers -= 1
                if self._closed and not queue:
                    return
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch_max))]
            self._maybe_housekeep()
            if batch:
                self._run(batch)

    def _maybe_housekeep(self) -> None:
        if self._housekeeping is None or time.monotonic() < self._next_housekeeping:
            return
        if not self._housekeeping_lock.acquire(blocking=False):
            return
        try:
            self._next_housekeeping = time.monotonic() + self._housekeeping_interval_s
            self._housekeeping()
        except Exception:  # housekeeping retries next interval; it must not stop writes
            log.exception("ledger housekeeping failed")
        finally:
            self._housekeeping_lock.release()

    def _outcomes(self, ops: list[Any]) -> list[tuple[Any, bool]]:
        """Each operation's result, or its error (``True``: failed)."""
        try:
            return [(result, False) for result in self._run_batch(ops)]
        except errors.DripError as exc:
            return [(exc, True)] * len(ops)
        except Exception as exc:
            if len(ops) > 1 and self._isolate is not None and self._isolate(exc):
                # one operation's value (say, text the database cannot store) fails the
                # whole transaction: run each alone, so that it fails only its own caller
                # (whatever did commit is found again by id, as the store's retries do)
                log.warning("ledger batch of %d operations failed (%r); running each alone",
                            len(ops), exc)  # fmt: skip
                return [outcome for op in ops for outcome in self._outcomes([op])]
            log.exception("ledger batch of %d operations failed", len(ops))
            return [(as_store_error(exc), True)] * len(ops)

    def _run(self, batch: list[_Item]) -> None:
        outcomes = self._outcomes([item.op for item in batch])
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, Any, bool]]] = {}
        for item, (result, failed) in zip(batch, outcomes, strict=True):
            if item.loop is None:
                if failed:
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
            else:
                by_loop.setdefault(item.loop, []).append((item, result, failed))
        for loop, answers in by_loop.items():
            pairs = [(item.future, result, failed) for item, result, failed in answers]
            try:
                loop.call_soon_threadsafe(_resolve_async, pairs)
            except RuntimeError:  # the loop is closed: its callers are gone
                self._void_orphans([(item, result) for item, result, failed in answers
                                    if not failed])  # fmt: skip

    def _void_orphans(self, answers: list[tuple[_Item, Any]]) -> None:
        """Private holds committed for callers whose event loop closed meanwhile: nobody
        can resolve them, so void them here (the loop cannot)."""
        for item, result in answers:
            voids = _landed_voids(item.op, result)
            if voids is None:
                continue
            with contextlib.suppress(errors.DripError):  # closing: the timeout releases it
                self._push(_Item(voids, None, concurrent.futures.Future()))

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish queued work, then stop the writer threads. Whatever is still queued
        once they stopped (or ``timeout_s`` passed with a batch still running) never
        runs: its callers hear that the ledger is closed instead of waiting forever."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        if left:
            self._refuse(left, errors.StoreError(self._closed_reason))

    @staticmethod
    def _refuse(items: list[_Item], error: errors.StoreError) -> None:
        """Fail items that were queued but will never run (nothing of theirs committed)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]]
        by_loop = {}
        for item in items:
            if item.loop is None:
                if not item.future.done():
                    item.future.set_exception(error)
            else:
                by_loop.setdefault(item.loop, []).append((item.future, error, True))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve_async, pairs)


def as_store_error(exc: Exception) -> errors.DripError:
    """A failure as every waiter of its batch hears it: typed errors as they are, any
    other exception as a ``StoreError`` (its cause kept)."""
    if isinstance(exc, errors.DripError):
        return exc
    wrapped = errors.StoreError(f"the ledger store failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


#: an event loop's batch: each operation with the future its caller awaits
LoopBatch = list[tuple[Any, asyncio.Future[Any]]]
#: how a loop batcher submits an operation of its own (the voids of an orphaned hold)
Resubmit = Callable[[Any], Awaitable[Any]]


def drop_orphans(batch: LoopBatch) -> LoopBatch:
    """The batch without the private holds whose callers were cancelled before it ran:
    nobody would ever resolve them."""
    if not any(future.cancelled() for _, future in batch):
        return batch
    return [(op, f) for op, f in batch if not (f.cancelled() and getattr(op, "private", False))]


_releasing: set[asyncio.Future[Any]] = set()


def _landed_voids(op: Any, results: list[Any]) -> Any:
    """The voids of a private hold chain that landed; None if ``op`` is not one, or
    was refused (then nothing is reserved)."""
    if any(isinstance(r, BaseException) for r in results):
        return None
    return orphan_voids(op)


def release_orphan(op: Any, results: list[Any], resubmit: Resubmit) -> None:
    """A private hold landed after its caller was cancelled: void it (else it would
    reserve the funds until its timeout)."""
    voids = _landed_voids(op, results)
    if voids is None:
        return
    try:
        voiding = asyncio.ensure_future(resubmit(voids))
    except Exception as exc:  # noqa: BLE001 - the store closed: its timeout releases it
        log.warning("could not void a cancelled caller's hold (its timeout releases it): %r",
                    exc)  # fmt: skip
        return
    _releasing.add(voiding)
    voiding.add_done_callback(_orphan_released)


def _orphan_released(done: asyncio.Future[Any]) -> None:
    _releasing.discard(done)
    failure = None if done.cancelled() else done.exception()
    if failure is None and not done.cancelled():
        failure = next((r for r in done.result() if isinstance(r, BaseException)), None)
    if failure is not None or done.cancelled():
        log.warning("could not void a cancelled caller's hold (its timeout releases it): %r",
                    failure)  # fmt: skip


def hand_off_cancelled(batch: LoopBatch, committer: Callable[[], GroupCommitter]) -> None:
    """A loop's batch task was cancelled (shutdown) with the batch maybe committed: the
    writer threads run it again (ids make a committed one a replay), so every waiter is
    answered; a private hold whose caller is gone already goes as its voids instead
    (refused, harmlessly, if the hold was never committed)."""
    live = drop_orphans(batch)
    # a live caller cancelled after this hand-off: its hold's voids go to the writer
    # threads too (the loop may be closing)
    answer(live, None, committer, lambda op: committer().submit_async(op))
    try:
        writer = committer()
        for op, future in batch:
            voids = orphan_voids(op) if future.cancelled() else None
            if voids is not None:
                writer.submit_async(voids)  # nobody waits: refused if there was no hold
    except errors.DripError:
        pass  # the store closed: those holds' timeouts release them


def _give(op: Any, future: asyncio.Future[Any], result: Any, resubmit: Resubmit | None) -> None:
    if not future.done():
        future.set_result(result)
    elif future.cancelled() and resubmit is not None:
        release_orphan(op, result, resubmit)


def fail(batch: LoopBatch, exc: Exception) -> None:
    """Every waiter of a loop's batch hears that it failed."""
    error = as_store_error(exc)
    for _, future in batch:
        if not future.done():  # the caller was cancelled; nobody waits
            future.set_exception(error)


def answer(
    batch: LoopBatch,
    results: list[Any] | None,
    committer: Callable[[], GroupCommitter],
    resubmit: Resubmit | None = None,
) -> None:
    """Give each waiter of a loop's batch its results; with ``None`` (the batch could not
    run on the loop) hand it to the writer threads, or fail it if the store was closed.
    A private hold whose caller was cancelled meanwhile is voided through ``resubmit``."""
    if results is None:
        try:
            writer = committer()
            for op, future in batch:
                chain_future(writer.submit_async(op), future, op, resubmit)
        except errors.DripError as exc:
            fail(batch, exc)
        return
    for (op, future), result in zip(batch, results, strict=True):
        _give(op, future, result, resubmit)


def chain_future(
    source: asyncio.Future[Any],
    target: asyncio.Future[Any],
    op: Any = None,
    resubmit: Resubmit | None = None,
) -> None:
    """Settle ``target`` as ``source`` settles (unless something settled it first)."""

    def copy(done: asyncio.Future[Any]) -> None:
        exc = done.exception()
        if exc is not None:
            if not target.done():
                target.set_exception(exc)
        else:
            _give(op, target, done.result(), resubmit)

    source.add_done_callback(copy)
