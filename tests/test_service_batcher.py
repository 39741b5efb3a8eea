"""Dynamic batching, backpressure, deadlines, graceful shutdown: the batcher alone and through the app."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import MicroBatcher
from service.errors import DeadlineExceeded, NotReady, QueueFull
from tests.helpers import FakeBackend, SpyBackend, TinyBundle, png_bytes, serve, until, wait_event

RAW = {"content-type": "image/png"}


def _echo(calls: list[tuple[int, object]], delay: float = 0.0):
    def infer(inputs: dict[str, np.ndarray]) -> np.ndarray:
        x = inputs["x"]
        calls.append((len(x), inputs.get("key")))
        time.sleep(delay)
        return x * 2

    return infer


def _batcher(infer, **kw) -> MicroBatcher:
    opts = {"max_batch_size": 4, "max_wait_ms": 50.0, "queue_size": 64}
    opts.update(kw)
    return MicroBatcher("embed", infer, **opts)


def test_requests_are_batched_split_and_returned_in_order() -> None:
    async def main() -> None:
        calls: list = []
        b = _batcher(_echo(calls, 0.02))
        await b.start()
        tickets = [b.announce() for _ in range(4)]  # four clients decoding
        xs = [np.full((n, 2), i, np.float32) for i, n in enumerate((1, 2, 3, 1))]
        outs = await asyncio.gather(*(b.submit({"x": x}, ticket=t) for x, t in zip(xs, tickets, strict=True)))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, x * 2)
        sizes = [n for n, _ in calls]
        assert sum(sizes) == 7 and max(sizes) == 4 and len(sizes) == 2  # 1+2+(1 of 3) | (2 of 3)+1
        await b.stop()

    asyncio.run(main())


def test_a_lone_request_does_not_wait_for_max_wait() -> None:
    async def main() -> None:
        b = _batcher(_echo([]), max_wait_ms=2000)
        await b.start()
        t0 = time.perf_counter()
        await b.submit({"x": np.ones((1, 2), np.float32)})
        assert time.perf_counter() - t0 < 0.5
        await b.stop()

    asyncio.run(main())


def test_batches_only_group_equal_keys() -> None:
    async def main() -> None:
        seen: list[list[int]] = []

        def infer(inputs):
            seen.append(sorted(set(inputs["k"].tolist())))
            time.sleep(0.01)
            return inputs["k"]

        b = _batcher(infer, max_batch_size=8)
        await b.start()
        tickets = [b.announce() for _ in range(6)]
        keys = [3, 5, 3, 5, 3, 7]
        outs = await asyncio.gather(
            *(b.submit({"k": np.array([k])}, key=k, ticket=t) for k, t in zip(keys, tickets, strict=True))
        )
        assert [int(o[0]) for o in outs] == keys
        assert all(len(s) == 1 for s in seen) and sorted(s[0] for s in seen) == [3, 5, 7]
        await b.stop()

    asyncio.run(main())


def test_queue_full_and_graceful_stop() -> None:
    async def main() -> None:
        gate, running = threading.Event(), threading.Event()

        def slow(inputs):
            running.set()
            gate.wait(5)
            return inputs["x"]

        b = _batcher(slow, max_batch_size=1, queue_size=2, max_wait_ms=0)
        await b.start()
        first = asyncio.create_task(b.submit({"x": np.ones((1, 1))}))  # running, blocks the worker
        await wait_event(running)
        queued = [asyncio.create_task(b.submit({"x": np.full((1, 1), i)})) for i in range(2)]
        await until(lambda: b.pending_rows == 2)
        with pytest.raises(QueueFull) as e:
            await b.submit({"x": np.ones((1, 1))})
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1 and e.value.limit == 2
        stop = asyncio.create_task(b.stop(timeout=5))
        await until(lambda: b.closing)
        with pytest.raises(NotReady):
            await b.submit({"x": np.ones((1, 1))})
        gate.set()
        await stop
        assert (await first).shape == (1, 1)
        assert [float((await q)[0, 0]) for q in queued] == [0.0, 1.0]  # queued work finished during shutdown

    asyncio.run(main())


def test_expired_requests_are_dropped_before_running() -> None:
    async def main() -> None:
        calls: list = []
        gate, running = threading.Event(), threading.Event()

        def infer(inputs):
            calls.append(len(inputs["x"]))
            running.set()
            gate.wait(5)
            return inputs["x"]

        b = _batcher(infer, max_batch_size=8, max_wait_ms=0)
        await b.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(b.submit({"x": np.ones((1, 1))}))
        await wait_event(running)
        with pytest.raises(DeadlineExceeded):
            await b.submit({"x": np.ones((3, 1))}, deadline=loop.time() + 0.05)
        assert b.pending_rows == 0
        gate.set()
        await blocker
        await b.stop()
        assert calls == [1]  # the expired request never ran

    asyncio.run(main())


# ---------------------------------------------------------------------------------- through the app
def test_concurrent_clients_form_batches(tiny_bundle: TinyBundle) -> None:
    spy = SpyBackend(delay_s=0.05)
    with serve(tiny_bundle.path, instance=spy, max_wait_ms=20, max_batch_size=8) as c:

        def call(i: int):
            return c.post("/embed", content=png_bytes(seed=i), headers={**RAW, "accept": "application/x-npy"})

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        assert all(r.status_code == 200 for r in results)
        sizes = [n for task, n in spy.calls if task == "embed"]
        assert sum(sizes) == 12 and max(sizes) > 1, sizes
        alone = c.post("/embed", content=png_bytes(seed=3), headers={**RAW, "accept": "application/x-npy"})
        np.testing.assert_allclose(
            np.load(io.BytesIO(results[3].content)), np.load(io.BytesIO(alone.content)), atol=1e-5
        )
        text = c.get("/metrics").text
        count = float(text.split('cae_batch_size_count{task="embed"} ')[1].split()[0])
        assert count < 12 + 1  # fewer inference calls than requests (+1: the lone request)


def test_large_request_is_split_across_batches(tiny_bundle: TinyBundle) -> None:
    spy = SpyBackend()
    with serve(tiny_bundle.path, instance=spy, max_batch_size=2) as c:
        files = [("files", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(5)]
        r = c.post("/embed", files=files, headers={"accept": "application/x-npy"})
        got = np.load(io.BytesIO(r.content))
        assert got.shape == (5, 64) and [n for _, n in spy.calls] == [2, 2, 1]
        one = c.post("/embed", content=png_bytes(seed=4), headers={**RAW, "accept": "application/x-npy"})
        np.testing.assert_allclose(got[4:], np.load(io.BytesIO(one.content)), atol=1e-5)


def test_full_queue_answers_429_with_retry_after(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend(delay_s=0.3)
    with serve(tiny_bundle.path, instance=fake, max_batch_size=1, queue_size=2, max_wait_ms=0) as c:
        with ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(lambda i: c.post("/embed", content=png_bytes(seed=i), headers=RAW), range(8))
            )
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes, codes
        busy = next(r for r in results if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["code"] == "queue_full"
        assert busy.json()["error"]["limit"] == 2
        assert 'cae_rejections_total{reason="queue_full"}' in c.get("/metrics").text


def test_hanging_backend_gives_504_and_the_server_stays_up(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend()
    with serve(tiny_bundle.path, instance=fake, request_timeout_s=1.5, shutdown_timeout_s=1) as c:
        fake.hang = True
        t0 = time.perf_counter()
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.perf_counter() - t0 < 5
        # a client deadline (X-Request-Timeout >= 1 s, the schema's minimum) is honoured too
        r = c.post("/embed", content=png_bytes(), headers={**RAW, "x-request-timeout": "1"})
        assert r.status_code == 504
        assert c.get("/healthz").status_code == 200
        fake.hang = False
        fake.release.set()


def test_inference_failures_are_500_without_internals_then_unhealthy(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend(fail=True)
    with serve(tiny_bundle.path, instance=fake) as c:
        for _ in range(3):
            r = c.post("/embed", content=png_bytes(), headers=RAW)
            assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
            assert "secret" not in r.text and "/opt" not in r.text
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        r = c.post("/embed", content=png_bytes(), headers=RAW)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_too_many_requests_in_flight_get_503_overloaded(tiny_bundle: TinyBundle) -> None:
    fake = FakeBackend()
    with serve(tiny_bundle.path, instance=fake, max_concurrent_requests=1, shutdown_timeout_s=1) as c:
        fake.hang = True
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/embed", content=png_bytes(), headers=RAW)
            assert fake.called.wait(5)  # the first request is now inside
            r = c.post("/embed", content=png_bytes(), headers=RAW)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1" and r.json()["error"]["limit"] == 1
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
            fake.hang = False
            fake.release.set()
            assert first.result(10).status_code == 200
