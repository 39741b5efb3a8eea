"""Dynamic micro-batching: requests from many clients become one inference call.

One :class:`MicroBatcher` per task. Requests (each a few images, already preprocessed) wait in a bounded
FIFO; a single worker coroutine forms a batch of up to ``max_batch_size`` rows from requests that share a
``key`` (reconstruct requests only batch with the same masked count: the graph needs one count per
batch), splits requests larger than the room left, runs the backend in a thread so the event loop keeps
serving, and hands each request its slice of the output.

Waiting policy: the worker waits (at most ``max_wait_ms`` after the oldest queued request arrived) only
while more requests are *announced*: routes take a :class:`Ticket` when they start decoding, so a lone
client never pays the wait, while a burst fills the batch. Under load no waiting is needed at all:
requests arriving during an inference form the next batch.

Backpressure: more than ``queue_size`` waiting rows -> :class:`QueueFull` (429, Retry-After from the
measured throughput). Deadlines: a request not finished by its deadline gets :class:`DeadlineExceeded`
(504) and its rows are dropped from the queue if they have not run yet. ``stop()`` refuses new work and
finishes what is queued and in flight.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull

if TYPE_CHECKING:
    from .metrics import Metrics

_logger = logging.getLogger("service")

# A batch's output: an array with a batch axis, or a list with one item per row (graphs whose outputs have
# no batch axis, like detect's N detections, return a dict of arrays per image)
Output = np.ndarray | list[Any]
InferFn = Callable[[dict[str, np.ndarray]], Output]


def _rows(out: Output) -> int | None:
    if isinstance(out, np.ndarray):
        return int(out.shape[0]) if out.ndim else None
    return len(out) if isinstance(out, list) else None


def _join(parts: list[Output]) -> Output:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], list):
        return [item for part in parts for item in part]
    return np.concatenate(parts)


@dataclass(eq=False)
class _Job:
    inputs: dict[str, np.ndarray]
    rows: int
    key: Hashable
    deadline: float
    future: asyncio.Future[Output]
    enqueued: float
    taken: int = 0  # rows handed to batches so far
    parts: list[Output] = field(default_factory=list)
    started: bool = False


class Ticket:
    """An announced request (decoding now, submitting soon). Released on submit or on exit."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher
        batcher._expected += 1

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._expected -= 1
            self._batcher._wakeup.set()
            self._batcher = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class MicroBatcher:
    def __init__(
        self,
        task: str,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics | None = None,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.task = task
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._infer = infer
        self._metrics = metrics
        self._on_result = on_result
        self._queue: collections.deque[_Job] = collections.deque()
        self._pending_rows = 0
        self._expected = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cae-{task}")
        self._rows_per_s = 0.0  # EWMA of inference throughput, for Retry-After
        self._running_since: float | None = None  # time.monotonic() when the current inference call began

    # ---------------------------------------------------------------------------------- client side
    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    @property
    def closing(self) -> bool:
        """Whether ``stop()`` has begun: new requests are refused."""
        return self._closing

    def announce(self) -> Ticket:
        """Register a request about to decode. When the queue is already full it is refused here (429),
        before its body is read and decoded: under overload that work, done only to be refused at
        ``submit``, took the CPU from admitted requests (measured: docs/reliability.md)."""
        if self._pending_rows >= self.queue_size:
            raise self._queue_full()
        return Ticket(self)

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"the {self.task} queue is full ({self._pending_rows} images waiting); retry later",
            limit=self.queue_size,
            retry_after_s=self._retry_after(),
        )

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        *,
        key: Hashable = None,
        deadline: float | None = None,
        ticket: Ticket | None = None,
    ) -> Output:
        """Queue one request (arrays with a batch axis) and await its output rows.

        ``deadline`` is in ``loop.time()`` seconds (None: no deadline)."""
        loop = asyncio.get_running_loop()
        try:
            if self._closing or self._worker is None:
                raise NotReady("the server is shutting down", code="shutting_down")
            rows = int(next(iter(inputs.values())).shape[0])
            if self._pending_rows > 0 and self._pending_rows + rows > self.queue_size:
                raise self._queue_full()
            now = loop.time()
            deadline = float("inf") if deadline is None else deadline
            if deadline <= now:
                raise DeadlineExceeded("the request deadline passed before inference")
            job = _Job(inputs, rows, key, deadline, loop.create_future(), now)
            self._queue.append(job)
            self._pending_rows += rows
            self._report_depth()
        finally:
            if ticket is not None:
                ticket.release()
        self._wakeup.set()
        try:
            timeout = None if deadline == float("inf") else max(0.0, deadline - loop.time())
            return await asyncio.wait_for(job.future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no {self.task} result within the request deadline") from None
        finally:
            if not job.future.done():
                job.future.cancel()
            if job.taken < job.rows and job in self._queue:
                self._drop(job)

    def running_for(self) -> float:
        """Seconds the current inference call has been running (0 when idle)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    def _retry_after(self) -> float:
        if self._rows_per_s <= 0:
            return 1.0
        return min(60.0, max(1.0, self._pending_rows / self._rows_per_s))

    # ---------------------------------------------------------------------------------- worker side
    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._loop(), name=f"batcher-{self.task}")

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests; finish queued and in-flight ones (up to ``timeout`` seconds)."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except TimeoutError:
                _logger.warning(
                    "%s batcher: %d images unfinished after %.1fs; abandoning them",
                    self.task,
                    self._pending_rows,
                    timeout,
                )
                self._worker.cancel()
                for job in list(self._queue):
                    self._fail(
                        job, NotReady("the server shut down before this request ran", code="shutting_down")
                    )
                    self._drop(job)
        self._executor.shutdown(wait=False)

    def _drop(self, job: _Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            return
        self._pending_rows -= job.rows - job.taken
        job.taken = job.rows
        self._report_depth()

    def _fail(self, job: _Job, err: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(err)

    def _report_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_rows.labels(self.task).set(self._pending_rows)

    def _rows_for(self, key: Hashable) -> int:
        return sum(j.rows - j.taken for j in self._queue if j.key == key)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather(loop)
            batch = self._take(loop.time())
            if batch:
                try:
                    await self._run(batch, loop)
                except Exception:  # a bug here must not kill the worker: fail the batch, keep serving
                    _logger.exception("%s batcher: unexpected error", self.task)
                    for job, _, _ in batch:
                        self._fail(job, InferenceFailed("inference failed"))

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for announced requests to join, until the batch is full or the oldest waited max_wait."""
        first = self._queue[0]
        until = first.enqueued + self.max_wait
        while not self._closing and self._expected > 0 and self._rows_for(first.key) < self.max_batch_size:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, now: float) -> list[tuple[_Job, int, int]]:
        """Up to max_batch_size rows of one key, oldest first, splitting the last request if needed."""
        picked: list[tuple[_Job, int, int]] = []
        key: Hashable = None
        rows = 0
        for job in list(self._queue):
            if job.future.done():  # its client gave up
                self._drop(job)
                continue
            if job.deadline <= now:
                self._fail(job, DeadlineExceeded(f"the request deadline passed while queued for {self.task}"))
                self._drop(job)
                continue
            if picked and job.key != key:
                continue
            key = job.key
            n = min(job.rows - job.taken, self.max_batch_size - rows)
            picked.append((job, job.taken, job.taken + n))
            job.taken += n
            self._pending_rows -= n
            rows += n
            if job.taken == job.rows:
                self._queue.remove(job)
            if rows == self.max_batch_size:
                break
        self._report_depth()
        return picked

    async def _run(self, batch: list[tuple[_Job, int, int]], loop: asyncio.AbstractEventLoop) -> None:
        names = list(batch[0][0].inputs)
        if len(batch) == 1:
            job, a, b = batch[0]
            inputs = {n: job.inputs[n][a:b] for n in names}
        else:
            inputs = {n: np.concatenate([j.inputs[n][a:b] for j, a, b in batch]) for n in names}
        rows = sum(b - a for _, a, b in batch)
        now = loop.time()
        m = self._metrics
        for job, _, _ in batch:
            if not job.started:
                job.started = True
                if m is not None:
                    m.queue_wait.labels(self.task).observe(now - job.enqueued)
        if m is not None:
            m.batch_size.labels(self.task).observe(rows)
        t0 = time.perf_counter()
        self._running_since = time.monotonic()
        try:
            out = await loop.run_in_executor(self._executor, self._infer, inputs)
            if _rows(out) != rows:
                raise ValueError(f"backend returned {getattr(out, 'shape', type(out))} for {rows} rows")
        except Exception:
            _logger.exception("%s inference failed on a batch of %d", self.task, rows)
            for job, _, _ in batch:
                self._fail(job, InferenceFailed(f"{self.task} inference failed"))
                self._drop(job)
            if self._on_result is not None:
                self._on_result(False)
            return
        finally:
            self._running_since = None
        dt = time.perf_counter() - t0
        if m is not None:
            m.inference.labels(self.task).observe(dt)
        rate = rows / max(dt, 1e-6)
        self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
        if self._on_result is not None:
            self._on_result(True)
        offset = 0
        for job, a, b in batch:
            job.parts.append(out[offset : offset + (b - a)])
            offset += b - a
            if b == job.rows and not job.future.done():
                job.future.set_result(_join(job.parts))
