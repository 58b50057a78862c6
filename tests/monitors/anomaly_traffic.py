"""Request events as the gateway makes them, for the anomaly tests (a few keys, seeded)."""

from __future__ import annotations

import numpy as np

from monitors.request_event import GuardVerdict, RequestEvent

KEYS = ("key-a", "key-b", "key-c")
START_US = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC


def traffic(
    rng: np.random.Generator,
    start_us: int,
    seconds: float,
    *,
    rate: float = 0.5,
    prompt_factor: dict[str, float] | None = None,
) -> list[RequestEvent]:
    """Poisson traffic of every key for ``seconds``; ``prompt_factor`` inflates prompts."""
    out = []
    for k, key in enumerate(KEYS):
        count = rng.poisson(rate * seconds)
        times = np.sort(rng.uniform(0, seconds, count))
        factor = (prompt_factor or {}).get(key, 1.0)
        for t in times:
            prompt = int(200 * (k + 1) * np.exp(0.4 * rng.standard_normal()) * factor)
            completion = int(150 * np.exp(0.4 * rng.standard_normal()))
            ttft = 0.2 * np.exp(0.2 * rng.standard_normal())
            out.append(
                RequestEvent(
                    time_us=start_us + int(t * 1e6),
                    request_id=f"req-{rng.integers(1 << 62):x}",
                    route="/v1/chat/completions",
                    key_id=key,
                    roles=("app",),
                    model="m1",
                    model_served="m1",
                    status=200,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    ttft_s=ttft,
                    duration_s=ttft + completion * 0.01,
                    watermark="watermarked",
                    repetition_rate=float(rng.beta(1.2, 40)),
                    guard_verdicts=[GuardVerdict("injection", "input", "pass", 0.05, 0.001)],
                )
            )
    return out
