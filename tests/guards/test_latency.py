"""What the guards cost: the input pipeline on a 1,000-token prompt, and a stream's added
time to first token. Prints the numbers (``pytest -s``); asserts the issue's budgets with
room for a shared, noisy machine (p50 5 ms; added time to first token 50 ms)."""

from __future__ import annotations

import statistics
import time

import pytest

from gateway.guards.input_check import InputGuard
from gateway.guards.output_filter import OutputGuard
from gateway.guards.settings import GuardSettings
from gateway.guards.token_limit import estimate_tokens
from tests.guards.calls import DONE, chat, chunk, make_call, stream_text

PARAGRAPH = (
    "Our quarterly review covers revenue, churn and the support backlog. The team shipped "
    "the new billing page, fixed the export bug and met the customer in Berlin. Next "
    "quarter we plan to migrate the reporting jobs and hire two engineers. "
)
PROMPT = (
    PARAGRAPH * 16
    + "Please reply to jane.doe@example.com or call +44 20 7946 0958. "
    + "Review: ```SELECT name FROM users WHERE id = ? AND status = 'active'```"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.fixture(scope="module")
def input_guard() -> InputGuard:
    # The classifier only flags here: the cost is the same, and this test measures cost,
    # not verdicts (the classifier's accuracy is bench/guards.py's to report).
    settings = GuardSettings(input={"prompt_injection": {"action": "flag"}})
    try:
        return InputGuard(settings)
    except Exception as exc:  # the shipped classifier may be missing while it is rebuilt
        pytest.skip(f"default input pipeline unavailable: {exc}")


async def test_input_pipeline_on_a_1000_token_prompt(input_guard: InputGuard) -> None:
    assert 950 <= estimate_tokens(PROMPT) <= 1100
    samples, cpu = [], []
    for i in range(300):
        call = make_call(chat(PROMPT))
        started, started_cpu = time.perf_counter(), time.thread_time()
        await input_guard.check(call)
        if i >= 20:  # warm caches first
            samples.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    p50, p99 = statistics.median(samples), percentile(samples, 0.99)
    scanners = sorted(input_guard.scanners)
    print(
        f"\ninput pipeline {scanners} 1,000 tokens: wall p50 {p50 * 1e3:.2f} ms "
        f"p99 {p99 * 1e3:.2f} ms; CPU p50 {statistics.median(cpu) * 1e3:.2f} ms "
        f"p99 {percentile(cpu, 0.99) * 1e3:.2f} ms"
    )
    per = {}
    for verdict in call.event.guard_verdicts:
        per[verdict.scanner] = f"{verdict.latency_s * 1e3:.3f} ms"
    print("per scanner (last call):", per)
    assert p50 < 0.005


async def test_stream_added_time_to_first_token() -> None:
    settings = GuardSettings()
    output = OutputGuard(settings)
    words = ("Hello", " there", ",", " here", " is", " the", " answer", ".")
    compute = []
    for _ in range(200):
        call = make_call(chat("hi"), stream=True)
        call.state["guards.vault"] = None
        filter_ = output.for_call(call)
        assert filter_ is not None
        spent = 0.0
        first_at = None
        for k, word in enumerate(words):
            started = time.perf_counter()
            out = await filter_.feed(chunk(word))
            spent += time.perf_counter() - started
            if stream_text(out)[0]:
                first_at = k
                break
        assert first_at == 1  # the first word leaves when the second arrives
        compute.append(spent)
        await filter_.feed(chunk(finish="stop") + DONE)
    p50, p95 = statistics.median(compute), percentile(compute, 0.95)
    print(
        f"\nstream added TTFT: held 1 token (word release); guard compute until the first "
        f"text left: p50 {p50 * 1e3:.3f} ms p95 {p95 * 1e3:.3f} ms"
    )
    assert p95 < 0.05


async def test_stream_cost_per_token() -> None:
    output = OutputGuard(GuardSettings())
    words = [" word" if i % 9 else " end." for i in range(500)]
    call = make_call(chat("hi"), stream=True)
    filter_ = output.for_call(call)
    assert filter_ is not None
    spent = 0.0
    delivered = b""
    for word in words:
        event = chunk(word)
        started = time.perf_counter()
        delivered += await filter_.feed(event)
        spent += time.perf_counter() - started
    delivered += await filter_.feed(chunk(finish="stop") + DONE)
    assert stream_text(delivered)[0] == "".join(words)
    per_token = spent / len(words)
    print(f"\nstream guard cost: {per_token * 1e6:.0f} us per token over {len(words)} tokens")
    assert per_token < 0.002
