"""Futures of the engine's requests, and the engine's execution contract (stated once, here and in
docs/engine-api.md).

Execution contract (every backend):
- Every client method submits its request and returns at once: a sync method returns a pending `APIFuture`;
  an `_async` method returns after submission too (`fut = await tc.forward_backward_async(...)`), except the
  sampling client's `sample_async` / `compute_logprobs_async` / `score_next_token_async`, which are coroutines
  resolving to the result (concurrent calls are gathered into one batched computation).
- `fut.result(timeout)` blocks until the result (or raises the request's error, or TimeoutError);
  `await fut` and `await fut.result_async()` wait without blocking the event loop.
- The requests of one training client run one at a time in submission order: a `save_state` submitted after
  an `optim_step` sees that step, whether or not the caller waited for the step. Sampling clients are frozen
  (a sampler on given weights), so their requests may run in any order or together.
- An error is raised by `.result()` of the request that failed; later requests of the same training client
  still run (they see the state the failed request left).

The local backend runs the requests of every client computing on a CPU on the process's one compute thread
(in submission order across clients; `on_compute_thread`), and each CUDA client's on a worker thread of its
own; the Ray backend runs them on actors and completes the future when the actors' results arrive.

Why one compute thread on a CPU: torch's CPU kernels run on OpenMP (libgomp), and every thread that has run a
parallel region keeps a team of worker threads for as long as it lives. Once a process's teams hold more threads
than it has CPUs, libgomp throttles their spin-waiting, so each of the many small parallel regions of a decode step
or a LoRA layer waits for its workers to wake. Measured (torch 2.13.0+cpu, Intel Xeon with AMX, 2 cores, bf16,
SmolLM2-135M with a rank-16 adapter, 16 replies of 48 tokens): 3.6-3.9 s on the main thread alone, 6.6 s on a
client thread once the main thread had computed too; a 16x576 by 576x1536 bf16 product 70 us against 170 us.
With all the computing on one thread (loading the base and building clients included), it ran in 3.7 s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The result of one submitted request (wraps a `concurrent.futures.Future`)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    @staticmethod
    def completed(value: T) -> APIFuture[T]:
        """A future that already holds its value (for requests with nothing to run)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(value)
        return APIFuture(future)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        if getattr(self._future, "on_compute_thread", False) and not self._future.done() and _is_compute_thread():
            raise RuntimeError(
                "a request waited for on the compute thread (from inside another request, e.g. a "
                "forward_backward_custom loss function) would never run: compute it before the request, or "
                "wait for it from another thread"
            )
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def __await__(self) -> Any:
        return self.result_async().__await__()

    def then(self, fn: Callable[[T], Any]) -> APIFuture:
        """A future of `fn(result)` (or of this request's error)."""
        chained: concurrent.futures.Future = concurrent.futures.Future()

        def done(future: concurrent.futures.Future) -> None:
            try:
                chained.set_result(fn(future.result()))
            except BaseException as e:  # handed to the caller's .result()
                chained.set_exception(e)

        self._future.add_done_callback(done)
        return APIFuture(chained)


class RequestQueue:
    """Runs submitted calls one at a time, in submission order (a training client's requests; a sampling
    client's batches): with `shared` (a client computing on a CPU) on the process's one compute thread, which
    every shared queue feeds in submission order; else on a worker thread of its own. The threads are daemons:
    an idle queue never keeps the interpreter alive."""

    def __init__(self, name: str, shared: bool = False):
        self._name = name
        self._shared = shared
        self._lock = threading.Lock()
        self._executor: _DaemonExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> APIFuture[T]:
        return APIFuture(self.submit_raw(fn, *args, **kwargs))

    def submit_raw(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._shared:
            future = _compute_executor().submit(fn, *args, **kwargs)
            future.on_compute_thread = True  # type: ignore[attr-defined]  # APIFuture.result refuses to deadlock
            return future
        with self._lock:
            if self._executor is None:
                self._executor = _DaemonExecutor(self._name)
            return self._executor.submit(fn, *args, **kwargs)

    def __del__(self) -> None:
        if self._executor is not None:
            self._executor.stop()


COMPUTE_THREAD_NAME = "rlhfkit-compute"
_compute: _DaemonExecutor | None = None
_compute_lock = threading.Lock()


def _compute_executor() -> _DaemonExecutor:
    """The process's one compute thread (started on first use, never stopped: a daemon)."""
    global _compute
    with _compute_lock:
        if _compute is None:
            _compute = _DaemonExecutor(COMPUTE_THREAD_NAME)
        return _compute


def _forget_compute_thread() -> None:
    """In a forked child: the parent's compute thread does not exist there; the child starts its own."""
    global _compute, _compute_lock
    _compute, _compute_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_compute_thread)


def _is_compute_thread() -> bool:
    return _compute is not None and threading.current_thread() is _compute.thread


def uses_compute_thread(device: Any) -> bool:
    """Whether a client on `device` computes on the process's one compute thread: on a CPU (see the module's
    docstring); a CUDA client keeps a thread of its own (its kernels run on the device, not on OpenMP)."""
    return getattr(device, "type", str(device)) == "cpu"


def on_compute_thread(device: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), run on the compute thread and waited for when `device` uses it (at once when the
    caller is that thread already), else in the caller's thread: loading a base model and building a client
    compute too, and a thread that has computed once keeps its OpenMP team."""
    if not uses_compute_thread(device) or _is_compute_thread():
        return fn(*args, **kwargs)
    return _compute_executor().submit(fn, *args, **kwargs).result()


class _DaemonExecutor(concurrent.futures.Executor):
    """A one-thread executor whose thread is a daemon (ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self, name: str):
        import queue

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def stop(self) -> None:
        """The thread ends after the calls already submitted."""
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller's .result()
                    future.set_exception(e)
            # an idle thread must not keep its last call alive: its closure holds the client (and its model)
            del item, future, fn, args, kwargs


class RequestBatcher:
    """Gathers requests submitted concurrently on the running event loop and serves them with one call of
    `run(requests) -> results` on `queue` (the event loop stays free meanwhile). It waits until a full loop
    turn brings no new request, so nested gathers (groups of envs, pairs of orders) land in the same batch."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], queue: RequestQueue):
        self.run = run
        self.queue = queue
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.flushing = False
        self.flush_task: asyncio.Task | None = None

    async def submit(self, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((request, future))
        if not self.flushing:
            self.flushing = True
            self.flush_task = loop.create_task(self._flush())  # kept referenced until it is done
        return await future

    async def _flush(self) -> None:
        seen = -1
        while seen != len(self.pending):
            seen = len(self.pending)
            for _ in range(3):
                await asyncio.sleep(0)
        batch, self.pending, self.flushing = self.pending, [], False
        try:
            results = await asyncio.wrap_future(self.queue.submit_raw(self.run, [request for request, _ in batch]))
        except BaseException as e:  # hand the error to every waiter
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
