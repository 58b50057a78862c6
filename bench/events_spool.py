"""What the event shipper costs: offer(), rendering a document, and the spool's fsync.

    .venv/bin/python bench/events_spool.py [--dir DIR] [--rounds N]

Prints, side by side from one run: the hand-off on the request path (EventShipper.offer),
rendering one ECS document (to_document + orjson), and appending a batch to the spool
with and without fsync, per batch and per event, for batch sizes 1, 50 and 500. The spool
directory decides the fsync figure: run it on the disk the gateway's spool_dir is on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from monitors.events.ecs import to_document
from monitors.events.settings import EventSettings
from monitors.events.shipper import EventShipper
from monitors.events.spool import Spool
from monitors.request_event import GuardVerdict, RequestEvent


def sample_event(i: int) -> RequestEvent:
    return RequestEvent(
        time_us=1_796_204_678_000_000 + i,
        request_id=f"01JDZ{i:021d}",
        route="/v1/chat/completions",
        key_id="key-0123456789",
        roles=("app",),
        tier="standard",
        model="deepseek-r1-distill-qwen-7b",
        model_served="deepseek-r1-distill-qwen-7b",
        upstream="vllm-a",
        stream=True,
        ratelimit="allowed",
        guard_verdicts=[GuardVerdict("pii", "input", "pass", 0.0, 0.0004)],
        status=200,
        prompt_tokens=512,
        completion_tokens=256,
        bytes_in=2048,
        bytes_out=9000,
        watermark="watermarked",
        watermark_z=6.1,
        repetition_rate=0.02,
        duration_s=3.2,
        ttft_s=0.18,
        upstream_s=3.19,
        queue_wait_s=0.0012,
    )


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


async def offer_cost(n: int) -> float:
    settings = EventSettings(url="http://127.0.0.1:9", queue_size=n + 1)
    shipper = EventShipper(settings)  # not started: offer() only queues
    events = [sample_event(i) for i in range(n)]
    start = time.perf_counter()
    for event in events:
        shipper.offer(event)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="spool here (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    settings = EventSettings(url="http://127.0.0.1:9")
    payload = orjson.dumps(to_document(sample_event(0), settings))
    print(f"document: {len(payload)} bytes of JSON")
    print(f"offer() on the request path: {asyncio.run(offer_cost(100_000)):.2f} us per event")
    events = [sample_event(i) for i in range(20_000)]
    render = per_call_us(lambda i: orjson.dumps(to_document(events[i], settings)), len(events))
    print(f"render (to_document + orjson, off the request path): {render:.1f} us per event")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        spool = Spool.create(Path(tmp) / "spool", 1024 * 1024 * 1024)
        print(f"spool in {tmp} ({args.rounds} batches each; median per batch, per event)")
        print(f"{'batch':>6} {'no fsync us':>12} {'fsync us':>10} {'fsync/event us':>15}")
        for size in (1, 50, 500):
            records = [(i, b"01JDZ%021d\n" % i + payload) for i in range(size)]
            timings: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for sync in (False, True):
                    start = time.perf_counter()
                    spool.append(records, sync=sync)
                    timings[sync].append(time.perf_counter() - start)
            plain = statistics.median(timings[False]) * 1e6
            synced = statistics.median(timings[True]) * 1e6
            print(f"{size:>6} {plain:>12.1f} {synced:>10.1f} {synced / size:>15.2f}")
        spool.close()


if __name__ == "__main__":
    main()
