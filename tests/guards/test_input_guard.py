"""InputGuard: actions, policies per role and key, header, verdicts, failures."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.guards.factory import build_default_input_scanners
from gateway.guards.input_check import InputGuard
from gateway.guards.settings import GuardSettings
from gateway.guards.vault import PIIVault
from tests.guards.calls import chat, make_call
from tests.guards.scanners_for_tests import BrokenScanner, SlowScanner, WordScanner

BLOCKING = GuardSettings(input={"prompt_injection": {"action": "block"}})
"""The default policy with the injection classifier blocking (its default is flag)."""


def guard(settings: GuardSettings | None = None, injection: object | None = None) -> InputGuard:
    settings = settings or BLOCKING
    # The rule scanners as shipped, and a stand-in classifier with a known answer (the
    # shipped classifier has its own tests, and test_offline runs it in the pipeline).
    without = settings.input["prompt_injection"].model_copy(update={"enabled": False})
    rules_only = settings.model_copy(
        update={"input": {**settings.input, "prompt_injection": without}}
    )
    scanners = build_default_input_scanners(rules_only)
    scanners["prompt_injection"] = injection or WordScanner()  # type: ignore[assignment]
    return InputGuard(settings, scanners=scanners)


def header(call) -> str:  # type: ignore[no-untyped-def]
    return dict(call.response_headers)[b"x-bastion-guard"].decode()


def verdicts(call) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {v.scanner: v.action for v in call.event.guard_verdicts}


async def test_clean_prompt_passes_unchanged() -> None:
    call = make_call(chat("What is the capital of France?"))
    await guard().check(call)
    assert header(call) == "pass"
    assert call.changes == {} and call.forward_body() == call.raw
    assert set(verdicts(call).values()) == {"pass"}
    assert {v.stage for v in call.event.guard_verdicts} == {"input"}
    assert all(v.latency_s >= 0 for v in call.event.guard_verdicts)
    assert isinstance(call.state["guards.vault"], PIIVault)


async def test_redact_forwards_cleaned_text_and_keeps_the_request() -> None:
    body = chat("I am jane@example.com, key AKIAIOSFODNN7EXAMPLE, ig\u200bnore")
    call = make_call(body)
    await guard().check(call)
    forwarded = orjson.loads(call.forward_body())["messages"][0]["content"]
    assert forwarded == "I am [EMAIL_1], key [REDACTED_SECRET], ignore"
    assert header(call) == "redact=invisible_text,secrets,pii"
    assert body["messages"][0]["content"].startswith("I am jane@")  # the request as asked
    assert call.state["guards.vault"].value_of("[EMAIL_1]") == "jane@example.com"


async def test_block_refuses_naming_the_scanner_not_the_text() -> None:
    call = make_call(chat("Look up user admin' OR '1'='1' -- now"))
    with pytest.raises(GatewayError) as refused:
        await guard().check(call)
    error = refused.value
    assert (error.status, error.type, error.code) == (400, "invalid_request_error", "guard_blocked")
    body = orjson.loads(error.body())["error"]
    assert "sql_injection" in body["message"] and "admin" not in body["message"]
    assert (b"x-bastion-guard", b"block=sql_injection") in error.headers()
    assert verdicts(call)["sql_injection"] == "block"
    assert call.changes == {}


async def test_flag_forwards_and_records() -> None:
    settings = GuardSettings(input={"prompt_injection": {"action": "flag"}})
    call = make_call(chat("an attack"))
    await guard(settings).check(call)
    assert header(call) == "flag=prompt_injection"
    assert call.forward_body() == call.raw
    assert verdicts(call)["prompt_injection"] == "flag"


async def test_threshold_decides() -> None:
    lenient = GuardSettings(input={"prompt_injection": {"threshold": 0.8}})
    call = make_call(chat("an attack"))
    await guard(lenient).check(call)  # WordScanner scores 0.7
    assert header(call) == "pass"
    scored = next(v for v in call.event.guard_verdicts if v.scanner == "prompt_injection")
    assert scored.score == pytest.approx(0.7) and scored.action == "pass"
    with pytest.raises(GatewayError):
        await guard().check(make_call(chat("an attack")))  # default threshold 0.5


async def test_message_roles_skip_system_prompts() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "attack mode on"},
            {"role": "user", "content": "hello"},
        ],
    }
    call = make_call(body)
    await guard().check(call)
    assert verdicts(call)["prompt_injection"] == "pass"


async def test_policy_per_role_and_per_key() -> None:
    settings = GuardSettings.model_validate(
        {
            "input": {"prompt_injection": {"action": "block"}},
            "roles": {"data_scientist": {"input": {"pii": {"action": "flag"}}}},
            "keys": {"trusted-key": {"input": {"prompt_injection": {"enabled": False}}}},
        }
    )
    checker = guard(settings)
    text = "mail jane@example.com about the attack"
    app = make_call(chat(text), roles=("app",))
    with pytest.raises(GatewayError):
        await checker.check(app)
    scientist = make_call(chat(text.replace("attack", "plan")), roles=("data_scientist",))
    await checker.check(scientist)
    assert header(scientist) == "flag=pii"
    assert scientist.changes == {}  # flagged, forwarded as written
    trusted = make_call(chat(text), key_id="trusted-key")
    await checker.check(trusted)
    assert "prompt_injection" not in verdicts(trusted)
    assert header(trusted) == "redact=pii"
    # A key's overrides apply after its roles'.
    both = make_call(chat(text), roles=("data_scientist",), key_id="trusted-key")
    await checker.check(both)
    assert header(both) == "flag=pii"


async def test_texts_everywhere_in_a_body() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "I am jane@example.com"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "mail", "arguments": '{"to": "bob@example.org"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sent to bob@example.org"},
        ],
    }
    call = make_call(body)
    await guard().check(call)
    sent = orjson.loads(call.forward_body())["messages"]
    assert sent[0]["content"][0]["text"] == "I am [EMAIL_1]"
    assert sent[0]["content"][1]["type"] == "image_url"
    assert orjson.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL_2]"}
    assert sent[2]["content"] == "sent to [EMAIL_2]"  # the same value, the same placeholder


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/completions", {"model": "m", "prompt": ["hi jane@example.com", "ok"]}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": "jane@example.com"}, "input"),
    ],
)
async def test_completions_and_embeddings(route: str, body: dict, field: str) -> None:  # type: ignore[type-arg]
    call = make_call(body, route=route)
    await guard().check(call)
    assert "jane@example.com" not in call.forward_body().decode()
    assert field in call.changes


async def test_token_prompts_blocked_or_flagged() -> None:
    body = {"model": "m", "prompt": [1, 2, 3]}
    with pytest.raises(GatewayError) as refused:
        await guard().check(make_call(body, route="/v1/completions"))
    assert refused.value.status == 400 and refused.value.code == "guard_unscannable_prompt"
    allowed = GuardSettings(token_prompts="allow")
    call = make_call(body, route="/v1/completions")
    await guard(allowed).check(call)
    assert header(call) == "flag=unscannable"


async def test_token_limit_blocks_long_prompts() -> None:
    settings = GuardSettings(token_limit={"max_tokens": 50})
    with pytest.raises(GatewayError) as refused:
        await guard(settings).check(make_call(chat("word " * 100)))
    assert "token_limit" in refused.value.message
    assert refused.value.code == "guard_blocked"
    assert guard(settings).scanners["token_limit"] is not None


async def test_guards_off() -> None:
    call = make_call(chat("admin' OR '1'='1' --"))
    await guard(GuardSettings(enabled=False)).check(call)
    assert call.event.guard_verdicts == [] and call.response_headers == []


@pytest.mark.parametrize("heavy", [False, True])
async def test_failing_scanner_fails_closed_with_a_503(heavy: bool) -> None:
    call = make_call(chat("hello"))
    with pytest.raises(GatewayError) as refused:
        await guard(injection=BrokenScanner(heavy)).check(call)
    assert refused.value.status == 503 and refused.value.code == "guard_unavailable"
    assert verdicts(call)["prompt_injection"] == "error"


@pytest.mark.parametrize("heavy", [False, True])
async def test_failing_scanner_fails_open_when_configured(heavy: bool) -> None:
    settings = GuardSettings(input={"prompt_injection": {"on_error": "fail_open"}})
    call = make_call(chat("hello jane@example.com"))
    await guard(settings, BrokenScanner(heavy)).check(call)
    assert verdicts(call)["prompt_injection"] == "error"
    assert header(call) == "redact=pii"  # the rest of the pipeline ran


async def test_slow_model_scanner_times_out_without_blocking_the_loop() -> None:
    settings = GuardSettings(model_scanners={"timeout_s": 0.05, "on_error": "fail_open"})
    checker = guard(settings, SlowScanner(delay_s=0.5))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    call = make_call(chat("an attack"))
    await checker.check(call)
    elapsed = time.perf_counter() - started
    task.cancel()
    assert elapsed < 0.4 and ticks >= 3  # the loop kept running while the model "ran"
    assert verdicts(call)["prompt_injection"] == "error"
    closed = guard(GuardSettings(model_scanners={"timeout_s": 0.05}), SlowScanner(0.5))
    with pytest.raises(GatewayError) as refused:
        await closed.check(make_call(chat("an attack")))
    assert refused.value.status == 503


async def test_model_scanner_in_the_pool_blocks() -> None:
    checker = guard(injection=SlowScanner(delay_s=0.001))
    with pytest.raises(GatewayError) as refused:
        await checker.check(make_call(chat("an attack")))
    assert refused.value.code == "guard_blocked"


async def test_conversation_vault_keeps_placeholders_across_calls() -> None:
    settings = GuardSettings(pii={"vault": "conversation"})
    checker = guard(settings)
    head = [(b"x-bastion-conversation-id", b"conv-7")]
    first = make_call(chat("I am jane@example.com"), headers=head)
    await checker.check(first)
    second = make_call(chat("and bob@example.org, still jane@example.com"), headers=head)
    await checker.check(second)
    sent = orjson.loads(second.forward_body())["messages"][0]["content"]
    assert sent == "and [EMAIL_2], still [EMAIL_1]"
    other_key = make_call(chat("I am eve@example.net"), headers=head, key_id="key-2")
    await checker.check(other_key)
    assert orjson.loads(other_key.forward_body())["messages"][0]["content"] == "I am [EMAIL_1]"
    assert other_key.state["guards.vault"] is not first.state["guards.vault"]
