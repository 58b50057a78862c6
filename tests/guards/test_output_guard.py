"""OutputGuard on whole answers and streams: restore, redact, block, hold-back, cut-off."""

from __future__ import annotations

import random

import orjson
import pytest

from gateway.errors import GatewayError, sse_error_event
from gateway.guards.factory import build_default_output_scanners
from gateway.guards.input_check import InputGuard
from gateway.guards.output_filter import OutputGuard
from gateway.guards.scanner import Finding, ScanContext
from gateway.guards.settings import GuardSettings
from gateway.guards.vault import PIIVault
from gateway.pipeline import CallContext
from tests.guards.calls import DONE, answer, chat, chunk, make_call, stream_text
from tests.guards.test_input_guard import guard

SECRET = "ghp_" + "a1B2" * 9


async def prepared(text: str, settings: GuardSettings | None = None, **kw) -> CallContext:  # type: ignore[no-untyped-def]
    call = make_call(chat(text), **kw)
    await guard(settings).check(call)
    return call


async def run_stream(filter_, pieces: list[str], end: bool = True) -> bytes:  # type: ignore[no-untyped-def]
    out = await filter_.feed(chunk(role="assistant", content=""))
    for piece in pieces:
        out += await filter_.feed(chunk(piece))
    if end:
        out += await filter_.feed(chunk(finish="stop") + DONE)
    return out + await filter_.close()


# ---------------------------------------------------------------- whole answers


async def test_whole_answer_restores_the_callers_values() -> None:
    call = await prepared("mail jane@example.com and call +44 20 7946 0958")
    guard_ = OutputGuard(GuardSettings()).for_call(call)
    assert guard_ is not None
    out = await guard_.feed(answer("Mailed [EMAIL_1]; calling [PHONE_1]."))
    content = orjson.loads(out)["choices"][0]["message"]["content"]
    assert content == "Mailed jane@example.com; calling +44 20 7946 0958."
    assert await guard_.close() == b""
    outputs = {v.scanner: v.action for v in call.event.guard_verdicts if v.stage == "output"}
    assert outputs == {
        "secrets": "pass",
        "pii_leak": "pass",
        "refusal": "pass",
        "json_validity": "pass",
    }
    assert (b"x-bastion-guard-output", b"pass") in call.response_headers


async def test_whole_answer_restores_tool_call_arguments() -> None:
    call = await prepared("send to o.neil@example.com")
    document = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "t",
                            "type": "function",
                            "function": {"name": "mail", "arguments": '{"to": "[EMAIL_1]"}'},
                        }
                    ],
                },
            }
        ]
    }
    out = await OutputGuard(GuardSettings()).for_call(call).feed(orjson.dumps(document))  # type: ignore[union-attr]
    arguments = orjson.loads(out)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(arguments) == {"to": "o.neil@example.com"}


async def test_whole_answer_redacts_secrets_and_flags_leaks_and_refusals() -> None:
    call = await prepared("hello")
    guard_ = OutputGuard(GuardSettings()).for_call(call)
    text = f"I'm sorry, but I can't help. Token {SECRET}, ask bob@example.org"
    out = await guard_.feed(answer(text))  # type: ignore[union-attr]
    content = orjson.loads(out)["choices"][0]["message"]["content"]
    assert SECRET not in content and "[REDACTED_SECRET]" in content
    assert "bob@example.org" in content  # pii_leak flags by default
    actions = {v.scanner: v.action for v in call.event.guard_verdicts if v.stage == "output"}
    assert actions["secrets"] == "redact" and actions["pii_leak"] == "flag"
    assert actions["refusal"] == "flag"
    assert (
        dict(call.response_headers)[b"x-bastion-guard-output"]
        == b"redact=secrets;flag=pii_leak,refusal"
    )


async def test_whole_answer_block_is_a_422() -> None:
    settings = GuardSettings(output={"secrets": {"action": "block"}})
    call = await prepared("hello", settings)
    with pytest.raises(GatewayError) as refused:
        await OutputGuard(settings).for_call(call).feed(answer(f"here: {SECRET}"))  # type: ignore[union-attr]
    error = refused.value
    assert (error.status, error.code) == (422, "output_guard_blocked")
    assert SECRET not in error.message and "secrets" in error.message
    assert error.headers() == [(b"x-bastion-guard-output", b"block=secrets")]
    assert any(v.stage == "output" and v.action == "block" for v in call.event.guard_verdicts)


async def test_json_validity_when_asked() -> None:
    settings = GuardSettings(output={"json_validity": {"action": "block"}})
    call = make_call(chat("hi", response_format={"type": "json_object"}))
    await guard(settings).check(call)
    output = OutputGuard(settings)
    assert await output.for_call(call).feed(answer('{"ok": true}'))  # type: ignore[union-attr]
    with pytest.raises(GatewayError):
        await output.for_call(call).feed(answer("Sure! {ok}"))  # type: ignore[union-attr]
    plain = await prepared("hi", settings)
    assert await output.for_call(plain).feed(answer("Sure! {ok}"))  # type: ignore[union-attr]


async def test_no_filter_for_embeddings_or_when_nothing_to_do() -> None:
    settings = GuardSettings(
        output={n: {"enabled": False} for n in ("secrets", "pii_leak", "refusal", "json_validity")}
    )
    embeddings = make_call({"model": "m", "input": "x"}, route="/v1/embeddings")
    assert OutputGuard(GuardSettings()).for_call(embeddings) is None
    assert OutputGuard(settings).for_call(await prepared("hello", settings)) is None
    # Something to restore still needs the filter.
    assert (
        OutputGuard(settings).for_call(await prepared("hi jane@example.com", settings)) is not None
    )


async def test_upstream_error_bodies_pass_untouched() -> None:
    call = await prepared("hello")
    body = b'{"error": {"message": "bad", "type": "x"}}'
    assert await OutputGuard(GuardSettings()).for_call(call).feed(body) == body  # type: ignore[union-attr]
    assert await OutputGuard(GuardSettings()).for_call(call).feed(b"<html>") == b"<html>"  # type: ignore[union-attr]


# ---------------------------------------------------------------- streams

ANSWER = "Dear [EMAIL_1], your card [CREDIT_CARD_1] is fine. Call [PHONE_1] today."
RESTORED = (
    "Dear jane@example.com, your card 4111 1111 1111 1111 is fine. Call +44 20 7946 0958 today."
)
PROMPT = "I am jane@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958"


async def test_stream_restores_placeholders_split_at_every_offset() -> None:
    call = await prepared(PROMPT, stream=True)
    output = OutputGuard(GuardSettings())
    for i in range(1, len(ANSWER)):
        for j in (i + 1, i + 5, len(ANSWER)):
            pieces = [ANSWER[:i], ANSWER[i:j], ANSWER[j:]]
            out = await run_stream(output.for_call(call), [p for p in pieces if p])
            content, _, done = stream_text(out)
            assert content == RESTORED, (i, j)
            assert done and out.endswith(DONE)
            assert "[EMAIL_1" not in out.decode() and "_1]" not in out.decode()


async def test_stream_restores_one_character_at_a_time_and_random_chunks() -> None:
    call = await prepared(PROMPT, stream=True)
    output = OutputGuard(GuardSettings())
    out = await run_stream(output.for_call(call), list(ANSWER))
    assert stream_text(out)[0] == RESTORED
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(ANSWER)), 6))
        pieces = [ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(ANSWER)], strict=True)]
        assert stream_text(await run_stream(output.for_call(call), pieces))[0] == RESTORED


async def test_stream_restores_tool_call_arguments_split_anywhere() -> None:
    call = await prepared("to o.neil@example.com", stream=True)
    arguments = '{"to": "[EMAIL_1]", "subject": "hi"}'
    for i in range(1, len(arguments)):
        filter_ = OutputGuard(GuardSettings()).for_call(call)
        out = await filter_.feed(
            chunk(
                role="assistant",
                tool_calls=[
                    {
                        "index": 0,
                        "id": "t",
                        "type": "function",
                        "function": {"name": "mail", "arguments": ""},
                    }
                ],
            )
        )
        for piece in (arguments[:i], arguments[i:]):
            out += await filter_.feed(
                chunk(tool_calls=[{"index": 0, "function": {"arguments": piece}}])
            )
        out += await filter_.feed(chunk(finish="tool_calls") + DONE)
        _, calls, done = stream_text(out)
        assert orjson.loads(calls[0]) == {"to": "o.neil@example.com", "subject": "hi"}, i
        assert done


class RecordingScanner:
    """Remembers each text it was given (to prove what was scanned before release)."""

    name = "refusal"

    def __init__(self) -> None:
        self.windows: list[str] = []

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        self.windows.append(text)
        return None


@pytest.mark.parametrize("release", ["word", "sentence"])
async def test_stream_never_releases_text_before_it_was_scanned(release: str) -> None:
    bound = 16
    settings = GuardSettings(stream={"release": release, "hold_back_tokens": bound})
    recorder = RecordingScanner()
    scanners = build_default_output_scanners(settings)
    scanners["refusal"] = recorder  # type: ignore[assignment]
    call = await prepared("hello", settings, stream=True)
    filter_ = OutputGuard(settings, scanners=scanners).for_call(call)
    words = ("The quick brown fox jumps over the lazy dog. " * 6 + "Unbroken" + "x" * 80).split(" ")
    arrived = ""
    delivered = ""
    scanned_to = 0
    await filter_.feed(chunk(role="assistant", content=""))  # type: ignore[union-attr]
    for k, word in enumerate(words):
        piece = word if k == 0 else " " + word
        arrived += piece
        before = len(recorder.windows)
        out = await filter_.feed(chunk(piece))  # type: ignore[union-attr]
        if len(recorder.windows) > before:
            assert arrived.endswith(recorder.windows[-1])  # each window reaches the end
            scanned_to = len(arrived)
        delivered += stream_text(out)[0]
        assert arrived.startswith(delivered)
        assert len(delivered) <= scanned_to
        held = len(arrived) - len(delivered)
        assert held <= bound * 4 + len(piece)  # the bound on what is held back
        if release == "sentence" and delivered:
            assert delivered.rstrip().endswith((".", "x"))  # whole sentences, or the bound
    tail = await filter_.feed(chunk(finish="stop") + DONE)  # type: ignore[union-attr]
    delivered += stream_text(tail)[0]
    assert delivered == arrived and tail.endswith(DONE)


async def test_stream_word_release_holds_only_the_word_still_arriving() -> None:
    call = await prepared("hello", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    first = await filter_.feed(chunk(role="assistant", content=""))  # type: ignore[union-attr]
    assert stream_text(first)[0] == "" and first  # the role chunk goes out at once
    assert stream_text(await filter_.feed(chunk("Hello")))[0] == ""  # type: ignore[union-attr]
    assert stream_text(await filter_.feed(chunk(" world")))[0] == "Hello"  # type: ignore[union-attr]


async def test_stream_redacts_a_secret_split_across_chunks() -> None:
    call = await prepared("hello", stream=True)
    text = f"Your token is {SECRET} keep it safe."
    for i in range(14, 14 + len(SECRET) + 1, 5):
        out = await run_stream(OutputGuard(GuardSettings()).for_call(call), [text[:i], text[i:]])
        content = stream_text(out)[0]
        assert content == "Your token is [REDACTED_SECRET] keep it safe.", i
        assert "a1B2" not in out.decode()


async def test_stream_block_cuts_off_without_done_and_no_part_of_it_leaks() -> None:
    settings = GuardSettings(output={"secrets": {"action": "block"}})
    call = await prepared("hello", settings, stream=True)
    filter_ = OutputGuard(settings).for_call(call)
    delivered = await filter_.feed(chunk(role="assistant", content=""))  # type: ignore[union-attr]
    pieces = ["Sure. ", "Here it is: ", SECRET[:10], SECRET[10:], " enjoy", " more"]
    with pytest.raises(GatewayError) as refused:
        for piece in pieces:
            delivered += await filter_.feed(chunk(piece))  # type: ignore[union-attr]
    error = refused.value
    assert error.code == "output_guard_blocked"
    delivered += sse_error_event(error)  # what the forwarder sends next
    assert DONE not in delivered and SECRET[:10] not in delivered.decode()
    assert stream_text(delivered.split(b'data: {"error"')[0])[0] == "Sure. Here it is: "
    verdict = next(
        v for v in call.event.guard_verdicts if v.scanner == "secrets" and v.stage == "output"
    )
    assert verdict.action == "block"
    assert (
        call.state["guards.output"]["released_chars"] < call.state["guards.output"]["scanned_chars"]
    )


async def test_stream_json_validity_on_the_whole_answer() -> None:
    settings = GuardSettings(output={"json_validity": {"action": "block"}})
    call = make_call(chat("hi", response_format={"type": "json_object"}), stream=True)
    await guard(settings).check(call)
    good = await run_stream(OutputGuard(settings).for_call(call), ['{"a":', " [1, 2]", "}"])
    assert good.endswith(DONE)
    with pytest.raises(GatewayError):
        await run_stream(OutputGuard(settings).for_call(call), ['{"a":', " [1, 2"])


async def test_stream_verdicts_recorded_once_at_the_end_and_never_for_unscanned_text() -> None:
    call = await prepared("hello", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    await filter_.feed(chunk("Partial answer with"))  # type: ignore[union-attr]
    assert not [v for v in call.event.guard_verdicts if v.stage == "output"]  # abandoned: none
    await filter_.feed(chunk(" more") + chunk(finish="stop") + DONE)  # type: ignore[union-attr]
    await filter_.close()  # type: ignore[union-attr]
    outputs = [v for v in call.event.guard_verdicts if v.stage == "output"]
    assert sorted(v.scanner for v in outputs) == ["json_validity", "pii_leak", "refusal", "secrets"]
    facts = call.state["guards.output"]
    assert facts["scanned_chars"] == facts["released_chars"] == len("Partial answer with more")


async def test_stream_close_without_done_releases_what_was_scanned() -> None:
    call = await prepared("hi jane@example.com", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    out = await filter_.feed(chunk("Bye [EMA"))  # type: ignore[union-attr]
    out += await filter_.feed(chunk("IL_1"))  # type: ignore[union-attr]
    out += await filter_.close()  # type: ignore[union-attr]
    assert stream_text(out)[0] == "Bye [EMAIL_1"  # not a placeholder: released as written
    assert DONE not in out


async def test_stream_keeps_other_events_in_order() -> None:
    call = await prepared("hello", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    out = await filter_.feed(chunk("one two"))  # type: ignore[union-attr]
    out += await filter_.feed(b": keep-alive\n\n" + chunk(" three", finish="stop") + usage + DONE)  # type: ignore[union-attr]
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and events[-2] == usage.strip()
    assert b": keep-alive" in events
    assert stream_text(out)[0] == "one two three"


async def test_completions_stream_text_is_scanned_and_restored() -> None:
    call = make_call(
        {"model": "m", "prompt": "hi jane@example.com", "stream": True},
        route="/v1/completions",
        stream=True,
    )
    await guard().check(call)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    out = b""
    for piece in ["Hello [EM", "AIL_1] ", f"{SECRET} ", "bye"]:
        document = {
            "id": "c",
            "object": "text_completion",
            "choices": [{"index": 0, "text": piece, "finish_reason": None}],
        }
        out += await filter_.feed(b"data: " + orjson.dumps(document) + b"\n\n")  # type: ignore[union-attr]
    out += await filter_.feed(DONE) + await filter_.close()  # type: ignore[union-attr]
    text = "".join(
        orjson.loads(e[6:])["choices"][0]["text"]
        for e in out.split(b"\n\n")
        if e.startswith(b"data: {")
    )
    assert text == "Hello jane@example.com [REDACTED_SECRET] bye"


def test_vault_is_per_call() -> None:
    assert PIIVault() is not PIIVault()
    assert InputGuard.__init__ is not None


async def test_guard_summary_for_the_audit() -> None:
    from gateway.guards.call_summary import guard_summary

    assert guard_summary(make_call(chat("hi"))) is None
    call = await prepared("I am jane@example.com", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    await filter_.feed(chunk("Hi [EMAIL_1]") + chunk(finish="stop") + DONE)  # type: ignore[union-attr]
    summary = guard_summary(call)
    assert summary is not None
    assert summary["input"]["details"] == {"pii": "personal data: EMAIL"}
    assert summary["output"]["scanned_chars"] == summary["output"]["released_chars"] == 12
    assert {(v["scanner"], v["stage"]) for v in summary["verdicts"]} >= {
        ("pii", "input"),
        ("secrets", "output"),
    }
    assert "jane@example.com" not in str(summary)


async def test_stream_data_that_is_not_json_is_scanned_too() -> None:
    call = await prepared("hello", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)
    out = await filter_.feed(f"data: plain text with {SECRET} inside\n\n".encode())  # type: ignore[union-attr]
    assert out == b"data: plain text with [REDACTED_SECRET] inside\n\n"
    settings = GuardSettings(output={"secrets": {"action": "block"}})
    blocking = OutputGuard(settings).for_call(await prepared("hello", settings, stream=True))
    with pytest.raises(GatewayError):
        await blocking.feed(f"data: {SECRET}\n\n".encode())  # type: ignore[union-attr]


async def test_redacted_choices_lose_their_logprobs() -> None:
    call = await prepared("hello")
    document = orjson.loads(answer(f"token {SECRET} ok"))
    document["choices"][0]["logprobs"] = {"content": [{"token": SECRET[:5], "logprob": -0.1}]}
    out = await OutputGuard(GuardSettings()).for_call(call).feed(orjson.dumps(document))  # type: ignore[union-attr]
    assert SECRET[:5] not in out.decode() and orjson.loads(out)["choices"][0]["logprobs"] is None
    streamed = await prepared("hello", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(streamed)
    out = b""
    for piece in ("token ", SECRET, " ok"):
        event = orjson.loads(chunk(piece)[6:])
        event["choices"][0]["logprobs"] = {"content": [{"token": piece, "logprob": -0.1}]}
        out += await filter_.feed(b"data: " + orjson.dumps(event) + b"\n\n")  # type: ignore[union-attr]
    out += await filter_.feed(chunk(finish="stop") + DONE)  # type: ignore[union-attr]
    assert SECRET not in out.decode()
    assert stream_text(out)[0] == "token [REDACTED_SECRET] ok"


async def test_stream_with_two_choices_interleaved() -> None:
    call = await prepared("I am jane@example.com and bob@example.org", stream=True)
    filter_ = OutputGuard(GuardSettings()).for_call(call)

    def piece(index: int, text: str | None, finish: str | None = None) -> bytes:
        delta = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({"id": "c", "choices": [choice]}) + b"\n\n"

    out = b""
    for index, text in [(0, "Hi [EMA"), (1, "Yo [EMAIL_"), (0, "IL_1] a"), (1, "2] b"), (0, " c")]:
        out += await filter_.feed(piece(index, text))  # type: ignore[union-attr]
    out += await filter_.feed(piece(0, None, "stop"))  # type: ignore[union-attr]
    out += await filter_.feed(piece(1, " d", "stop") + DONE)  # type: ignore[union-attr]
    texts: dict[int, str] = {}
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in orjson.loads(event[6:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + (
                    choice.get("delta", {}).get("content") or ""
                )
    assert texts == {0: "Hi jane@example.com a c", 1: "Yo bob@example.org b d"}
    assert out.endswith(DONE)
