"""What ``MetricsSink.offer`` costs per request event, single-process and multiprocess.

    .venv/bin/python -m bench.metrics_sink_cost [--events 20000] [--repeat 5]

Runs each mode in a fresh interpreter (prometheus_client chooses its value store when it
is first imported, from ``PROMETHEUS_MULTIPROC_DIR``), feeds the same events to a
``MetricsSink`` and prints the best of ``--repeat`` runs in microseconds of CPU time per
event (the thread's CPU time: on a shared machine, wall time measures the neighbours), for
three kinds of event: a streamed model call with tokens, a watermark verdict, a
repetition rate and two guard verdicts (the most observations: 20 writes); a plain model
call; a 401 refusal. "/direct": every observation written as it is made (no batch, for
comparison); "/1": every event flushed alone (a quiet gateway); "/100": a hundred events
per flush (about 1,000 requests/s per worker at the 0.1 s interval). The
in-flight gauge's enter/leave pair is timed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROUTE = "/v1/chat/completions"


def _events() -> dict[str, object]:
    from monitors.request_event import GuardVerdict, RequestEvent

    full = RequestEvent(
        time_us=0, request_id="r", route=ROUTE, model="dev-model", model_served="dev-model",
        upstream="u1", stream=True, status=200, prompt_tokens=12, completion_tokens=40,
        cached_tokens=8, duration_s=0.8, ttft_s=0.05, upstream_s=0.79, watermark="watermarked",
        repetition_rate=0.02, ratelimit="allowed",
        guard_verdicts=[
            GuardVerdict("pii", "input", "pass", 0.0, 0.0004),
            GuardVerdict("secrets", "output", "pass", 0.0, 0.0002),
        ],
    )  # fmt: skip
    plain = RequestEvent(
        time_us=0, request_id="r", route=ROUTE, model="dev-model", upstream="u1", status=200,
        prompt_tokens=12, completion_tokens=40, duration_s=0.3, ttft_s=0.3, upstream_s=0.29,
    )  # fmt: skip
    refusal = RequestEvent(
        time_us=0, request_id="r", route=ROUTE, kind="refusal", status=401,
        error_type="invalid_api_key", duration_s=0.0002,
    )  # fmt: skip
    return {"full": full, "plain": plain, "refusal": refusal}


class _Direct:
    """What the sink did before MetricBatch: every observation written at once."""

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        counter.inc(amount)

    def observe(self, histogram: Any, value: float) -> None:
        histogram.observe(value)

    def flush(self) -> None:
        pass


def _child(n: int, repeat: int) -> None:
    asyncio.run(_measure(n, repeat))


async def _measure(n: int, repeat: int) -> None:
    # Inside a running loop, as in the gateway: offer() sums, the flush writes. The flush
    # is called by hand every `per_flush` events: 1 is a quiet gateway (each request
    # flushed alone), 100 about 1,000 requests/s per worker with the 0.1 s interval.
    from monitors.metrics_sink import InFlight, MetricsSink

    result: dict[str, float] = {}
    for name, event in _events().items():
        for per_flush in ("direct", 1, 100):
            sink = MetricsSink(models=["dev-model"], routes=[ROUTE], upstreams=["u1"])
            if per_flush == "direct":
                sink._batch = _Direct()  # type: ignore[assignment]
            each = 1 if per_flush == "direct" else int(per_flush)
            best = float("inf")
            for _ in range(repeat):
                start = time.thread_time()
                for _ in range(n // each):
                    for _ in range(each):
                        sink.offer(event)  # type: ignore[arg-type]
                    sink.flush()
                best = min(best, time.thread_time() - start)
            result[f"{name} /{per_flush}"] = best / (n // each * each) * 1e6
    flight = InFlight()
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(n):
            flight.enter(ROUTE)
            flight.leave(ROUTE)
        best = min(best, time.thread_time() - start)
    result["in_flight pair"] = best / n * 1e6
    print(json.dumps(result))


def _run(n: int, repeat: int, multiprocess: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory(prefix="bastion-prom-") as directory:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        out = subprocess.run(
            [sys.executable, "-m", "bench.metrics_sink_cost", "--child", str(n), str(repeat)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    single = _run(args.events, args.repeat, multiprocess=False)
    multi = _run(args.events, args.repeat, multiprocess=True)
    python = sys.version.split()[0]
    print(f"CPU µs per event, best of {args.repeat} x {args.events} (python {python})")
    print(f"{'event':<18}{'single-process':>16}{'multiprocess':>14}")
    for name in single:
        print(f"{name:<18}{single[name]:>16.2f}{multi[name]:>14.2f}")


if __name__ == "__main__":
    main()
