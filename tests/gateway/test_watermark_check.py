"""Watermark verdicts in the gateway: keys, the detect endpoint, headers and stream comments.

The texts are made here: token ids sampled from a random "model" through the scheme's
reference biasing (tests/watermarking.py), decoded with a tiny byte-level BPE tokenizer
trained in the test. The fixture upstream echoes the last user message (or the prompt),
so sending such a text makes the upstream answer with it.

Decode and re-encode do not always give the sampled ids back: a byte-level BPE encodes
a string canonically (greedy merges), and randomly sampled token sequences are often not
canonical ("ab" + "c" comes back as "abc"). The gateway only ever sees text, so every
expectation below is built from the re-encoded ids, exactly as the gateway does;
``test_detection_survives_the_tokenization_round_trip`` measures how much is lost.
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from gateway.answer_text import AnswerTextFilter
from gateway.config import ConfigError, WatermarkSettings, load_settings
from gateway.errors import InvalidRequest
from gateway.pipeline import CallContext, run_filters
from gateway.rbac import Principal
from gateway.watermark.answer_filter import WatermarkFilterSource
from gateway.watermark.detector import TokenizerUnavailable, WatermarkDetector
from gateway.watermark.endpoint import WatermarkEndpoint
from gateway.watermark.keys import KEYS_ENV_VAR, load_watermark_keys, parse_keys
from inference.watermark import WatermarkParams, derive_key, detect, score
from monitors.request_event import RequestEvent
from tests.support import ProcessPool, assert_openai_error, chat_body, free_port, run_bastion
from tests.watermarking import build_tokenizer, sample

SECRETS = {"k0": b"0" * 32, "k1": b"1" * 32}
KEYS = {key_id: derive_key(secret, key_id) for key_id, secret in SECRETS.items()}
PARAMS = WatermarkParams(key=KEYS["k1"])  # the tier generates with k1; k0 is retired


def b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BASTION_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def printable_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Tokens made of printable ASCII (and the byte-level space, "Ġ"): no broken UTF-8."""
    vocab = tokenizer.get_vocab()
    return np.array(
        sorted(i for s, i in vocab.items() if all(33 <= ord(c) < 127 or c == "Ġ" for c in s))
    )


def texts(tokenizer: Tokenizer, params: WatermarkParams | None, n: int, seed: int) -> list[str]:
    ids = sample(
        params,
        n,
        200,
        tokenizer.get_vocab_size(),
        np.random.default_rng(seed),
        allowed=printable_ids(tokenizer),
    )
    return [tokenizer.decode(row.tolist()) for row in ids]


def expected_verdict(tokenizer: Tokenizer, text: str) -> str:
    """The header the gateway must send for an answer whose whole content is ``text``."""
    found = detect(KEYS, PARAMS, np.array(tokenizer.encode(text, add_special_tokens=False).ids))
    if found.watermarked:
        return f"watermarked; z={found.z_score:.2f}; key={found.key_id}"
    return f"absent; z={found.z_score:.2f}"


# --- keys and configuration ---------------------------------------------------------------


def test_keys_from_lines_json_file_and_environment(tmp_path: Path) -> None:
    lines = f"# rotated 2026-11\nk0: {b64(SECRETS['k0'])}\n\n"
    assert parse_keys(lines, "x") == {"k0": SECRETS["k0"]}
    assert parse_keys(json.dumps({"k1": b64(SECRETS["k1"])}), "x") == {"k1": SECRETS["k1"]}
    keys_file = tmp_path / "watermark.keys"
    keys_file.write_text(lines)
    settings = WatermarkSettings(enabled=True, keys_file=keys_file)
    environ = {KEYS_ENV_VAR: json.dumps({"k1": b64(SECRETS["k1"])})}
    assert load_watermark_keys(settings, environ) == KEYS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k0 " + b64(b"0" * 32), "line 1: expected 'key_id: base64 secret'"),
        ("k0: not base64!", "key 'k0': not valid base64"),
        ("k0: " + b64(b"short"), "at least 16 random bytes, not 5"),
        ("bad id: " + b64(b"0" * 32), "key id 'bad id'"),
        (f"k0: {b64(b'0' * 32)}\nk0: {b64(b'1' * 32)}", "key id 'k0' appears twice"),
        ('["k0"]', "not a valid JSON object"),
    ],
)
def test_bad_keys_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_keys(text, "watermark.keys_file")


def test_keys_are_required_and_not_twice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no watermark keys"):
        load_watermark_keys(WatermarkSettings(enabled=True), {})
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"k0: {b64(SECRETS['k0'])}")
    environ = {KEYS_ENV_VAR: json.dumps({"k0": b64(SECRETS["k1"])})}
    with pytest.raises(ConfigError, match=r"also in watermark\.keys_file"):
        load_watermark_keys(WatermarkSettings(keys_file=keys_file), environ)


def test_configuration_section(tmp_path: Path, tokenizer_dir: Path) -> None:
    upstream = {"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}
    settings = load_settings(
        upstreams=[upstream],
        watermark={"enabled": True, "gamma": 0.5, "tokenizers": {"m1": str(tokenizer_dir)}},
    )
    assert settings.watermark.gamma == 0.5 and settings.watermark.z_threshold == 4.0
    with pytest.raises(ConfigError, match=r"^watermark\.tokenizers: m1: no tokenizer\.json in "):
        load_settings(upstreams=[upstream], watermark={"tokenizers": {"m1": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"watermark\.colour: unknown key"):
        load_settings(upstreams=[upstream], watermark={"colour": 1})
    with pytest.raises(ConfigError, match=r"watermark\.gamma"):
        load_settings(upstreams=[upstream], watermark={"gamma": 1.5})


def test_serve_refuses_to_start_without_keys(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = {
        "dev": True,
        "upstreams": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        "watermark": {"enabled": True, "tokenizers": {"m1": str(tokenizer_dir)}},
    }
    done = run_bastion(["serve", "--port", str(free_port())], config, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "bastion: configuration error: watermark.enabled: no watermark keys; "
        "set watermark.keys_file or BASTION_WATERMARK_KEYS"
    )


# --- the detector without a server ----------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tokenizer_dir: Path) -> WatermarkDetector:
    settings = WatermarkSettings(enabled=True, tokenizers={"m1": tokenizer_dir})
    return WatermarkDetector(settings, KEYS)


def test_detection_survives_the_tokenization_round_trip(tokenizer: Tokenizer) -> None:
    """Measured on 300 sequences of 200 tokens: decode -> encode gives the sampled ids
    back for only 13 % of them, yet 97 % of the distinct sampled bigrams survive (90 % at
    worst), and all 300 are still detected (median z 11.8, against 12.1 on the sampled
    ids; lowest 8.4). A real model's output is mostly canonically tokenized, so it loses
    less."""
    vocab = tokenizer.get_vocab_size()
    rng = np.random.default_rng(11)
    ids = sample(PARAMS, 40, 200, vocab, rng, allowed=printable_ids(tokenizer))
    identical, kept, detected = 0, [], 0
    for row in ids:
        again = np.array(tokenizer.encode(tokenizer.decode(row.tolist())).ids)
        identical += len(again) == len(row) and bool(np.all(again == row))
        sampled = set(itertools.pairwise(row.tolist()))
        kept.append(len(sampled & set(itertools.pairwise(again.tolist()))) / len(sampled))
        before, after = score(PARAMS, row), score(PARAMS, again)
        assert before.watermarked
        detected += after.watermarked
    assert identical < len(ids)  # the round trip is lossy...
    assert detected == len(ids)  # ...but not enough to lose the watermark
    assert np.median(kept) > 0.9


def answer_call(detector: WatermarkDetector, model: str, stream: bool) -> CallContext:
    """A call to ``model`` with the answer filters the gateway gives text routes."""
    principal = Principal("k", frozenset({"app"}), None, None, "standard")
    event = RequestEvent(time_us=0, request_id="r", route="/v1/chat/completions")
    event.model_served = model
    call = CallContext("/v1/chat/completions", {}, principal, event, b"{}", {}, stream=stream)
    sources = [AnswerTextFilter(), WatermarkFilterSource(detector)]
    call.filters = [f for f in (s.for_call(call) for s in sources) if f is not None]
    return call


async def run_whole(call: CallContext, body: bytes) -> list[tuple[bytes, bytes]]:
    assert await run_filters(call.filters, body, last=True) == body
    return call.response_headers


async def test_stream_filter_inserts_the_verdict_before_done(
    detector: WatermarkDetector, tokenizer: Tokenizer
) -> None:
    text = texts(tokenizer, PARAMS, 1, seed=12)[0]
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        *({"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces),
        {"choices": [], "usage": {"prompt_tokens": 1}},
    ]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert detector.for_model("m1") is not None and detector.for_model("other") is None
    call = answer_call(detector, "m1", stream=True)
    assert len(call.filters) == 2
    out = b""
    for at in range(0, len(wire) - 1, 300):  # whole events at a time, as the framer gives
        end = wire.find(b"\n\n", at + 300)
        out += await run_filters(call.filters, wire[at:] if end < 0 else wire[at : end + 2], False)
    sent = out
    verdict = expected_verdict(tokenizer, text)
    comment = f": x-bastion-watermark: {verdict}\n\n".encode()
    out += await run_filters(call.filters, b"data: [DONE]\n\n", last=True)
    assert out == sent + comment + b"data: [DONE]\n\n"
    assert call.event.watermark == verdict.split(";")[0]
    assert call.event.watermark_z is not None

    # Without [DONE], the verdict comes when the stream ends.
    late = answer_call(detector, "m1", stream=True)
    assert await run_filters(late.filters, wire, last=False) == wire
    assert await run_filters(late.filters, b"", last=True) == comment
    # A model without a tokenizer gets no watermark filter.
    assert len(answer_call(detector, "other", stream=True).filters) == 1


async def test_body_filter_reads_every_choice_and_field(
    detector: WatermarkDetector, tokenizer: Tokenizer
) -> None:
    marked = texts(tokenizer, PARAMS, 2, seed=13)
    body = {
        "choices": [
            {"index": 0, "message": {"content": marked[0], "reasoning_content": marked[1]}},
            {"index": 1, "message": {"content": None, "tool_calls": []}},
        ]
    }
    call = answer_call(detector, "m1", stream=False)
    [(name, value)] = await run_whole(call, json.dumps(body).encode())
    segments = [tokenizer.encode(t, add_special_tokens=False).ids for t in marked]
    both = detector.score_ids(segments)
    assert name == b"x-bastion-watermark"
    assert value == f"watermarked; z={both.z_score:.2f}; key=k1".encode()
    assert call.event.watermark == "watermarked" and call.event.watermark_key == "k1"
    assert both.scored > score(PARAMS, np.array(segments[0])).scored
    assert await run_whole(answer_call(detector, "m1", False), b"not json") == []
    [(_, empty)] = await run_whole(answer_call(detector, "m1", False), b'{"choices": []}')
    assert empty == b"absent; z=0.00"


async def test_a_broken_tokenizer_costs_the_verdict_not_the_answer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    broken = WatermarkDetector(WatermarkSettings(tokenizers={"m1": tmp_path}), KEYS)
    for _ in range(2):  # tried once, then the failure is remembered
        with pytest.raises(TokenizerUnavailable):
            await broken.tokenizer("m1")
    assert list(broken._failed) == ["m1"]
    call = answer_call(broken, "m1", stream=False)
    assert await run_whole(call, b'{"choices": [{"text": "hello"}]}') == []
    assert call.event.watermark is None


def test_detect_endpoint_needs_a_model_only_when_ambiguous(detector: WatermarkDetector) -> None:
    assert WatermarkEndpoint._model(detector, None) == "m1"
    two = WatermarkDetector(
        WatermarkSettings(tokenizers={"a": detector._paths["m1"], "b": detector._paths["m1"]}),
        KEYS,
    )
    with pytest.raises(InvalidRequest, match="'model' is required"):
        WatermarkEndpoint._model(two, None)


# --- through a running gateway --------------------------------------------------------------


@pytest.fixture(scope="module")
def gateways(
    module_pool: ProcessPool, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A gateway with the watermark (m1 and m2 have tokenizers, m3 not) and one without."""
    upstream = module_pool.upstream("wm-up", ["m1", "m2", "m3"])
    keys_file = tmp_path_factory.mktemp("wm-keys") / "watermark.keys"
    keys_file.write_text(f"k0: {b64(SECRETS['k0'])}\n")
    tokenizers = {"m1": str(tokenizer_dir), "m2": str(tokenizer_dir / "tokenizer.json")}
    on = module_pool.gateway(
        [upstream],
        env={KEYS_ENV_VAR: json.dumps({"k1": b64(SECRETS["k1"])})},
        watermark={"enabled": True, "keys_file": str(keys_file), "tokenizers": tokenizers},
    )
    off = module_pool.gateway([upstream])
    return {"on": on, "off": off}


@pytest.fixture(scope="module")
def samples(tokenizer: Tokenizer) -> dict[str, list[str]]:
    return {
        "marked": texts(tokenizer, PARAMS, 3, seed=21),
        "plain": texts(tokenizer, None, 3, seed=22),
    }


def verdict_counts(http: httpx.Client) -> dict[str, float]:
    """``bastion_watermark_verdicts_total`` by verdict, from /metrics."""
    counts = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("bastion_watermark_verdicts_total{"):
            labels, value = line.split(" ")
            counts[labels.split('"')[1]] = float(value)
    return counts


def test_detect_endpoint(
    gateways: dict[str, Any], samples: dict[str, list[str]], tokenizer: Tokenizer
) -> None:
    http: httpx.Client = gateways["on"].http
    for text in samples["marked"]:
        ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids)
        expected = detect(KEYS, PARAMS, ids)
        r = http.post("/v1/watermark/detect", json={"text": text, "model": "m1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["watermarked"] is True and body["key_id"] == "k1"
        assert body["z_score"] == pytest.approx(expected.z_score)
        assert body["p_value"] == pytest.approx(expected.p_value)
        assert (body["tokens"], body["scored"], body["green"]) == (
            len(ids),
            expected.scored,
            expected.green,
        )
    for text in samples["plain"]:
        body = http.post("/v1/watermark/detect", json={"text": text, "model": "m2"}).json()
        assert body["watermarked"] is False and body["key_id"] is None
        assert body["z_score"] < 4


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"text": "hi", "model": "m3"}, 404, "model_not_found", "model"),
        ({"text": "hi", "model": "nope"}, 404, "model_not_found", "model"),
        ({"text": "hi"}, 400, "invalid_request", "model"),  # two models have tokenizers
        ({"model": "m1"}, 400, "invalid_request", "text"),
        ({"text": 5, "model": "m1"}, 400, "invalid_request", "text"),
        ({"text": "hi", "model": "m1", "extra": 1}, 400, "invalid_request", "extra"),
    ],
)
def test_detect_endpoint_errors(
    gateways: dict[str, Any], body: dict[str, Any], status: int, code: str, param: str
) -> None:
    r = gateways["on"].http.post("/v1/watermark/detect", json=body)
    assert_openai_error(r, status, "invalid_request_error", code, param)


def test_detect_endpoint_bad_json_and_disabled(gateways: dict[str, Any]) -> None:
    r = gateways["on"].http.post("/v1/watermark/detect", content=b"{nope")
    assert_openai_error(r, 400, "invalid_request_error", "invalid_json")
    r = gateways["off"].http.post("/v1/watermark/detect", json={"text": "hi"})
    assert_openai_error(r, 404, "invalid_request_error", "watermark_disabled")


def test_verdict_header_on_answers(
    gateways: dict[str, Any], samples: dict[str, list[str]], tokenizer: Tokenizer
) -> None:
    http: httpx.Client = gateways["on"].http
    before = verdict_counts(http)
    for kind in ("marked", "plain"):
        text = samples[kind][0]
        r = http.post("/v1/chat/completions", json=chat_body("m1", text))
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert answer.endswith(text)  # "upstream=wm-up model=m1 echo=<text>"
        verdict = r.headers["x-bastion-watermark"]
        assert verdict == expected_verdict(tokenizer, answer)
        assert verdict.startswith("watermarked; " if kind == "marked" else "absent; ")
    r = http.post("/v1/completions", json={"model": "m2", "prompt": samples["marked"][1]})
    assert r.headers["x-bastion-watermark"] == expected_verdict(
        tokenizer, r.json()["choices"][0]["text"]
    )
    # No header where there is nothing to check: m3 has no tokenizer, embeddings are not text.
    r = http.post("/v1/chat/completions", json=chat_body("m3", samples["marked"][0]))
    assert r.status_code == 200 and "x-bastion-watermark" not in r.headers
    r = http.post("/v1/embeddings", json={"model": "m1", "input": samples["marked"][0]})
    assert r.status_code == 200 and "x-bastion-watermark" not in r.headers
    r = gateways["off"].http.post("/v1/chat/completions", json=chat_body("m1", "hi"))
    assert r.status_code == 200 and "x-bastion-watermark" not in r.headers

    after = verdict_counts(http)
    assert after["watermarked"] - before["watermarked"] == 2
    assert after["absent"] - before["absent"] == 1


def test_verdict_comment_ends_the_stream(
    gateways: dict[str, Any], samples: dict[str, list[str]], tokenizer: Tokenizer
) -> None:
    gateway = gateways["on"]
    text = samples["marked"][2]
    body = chat_body("m1", text, stream=True)
    with gateway.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    answer = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in lines
        if line.startswith("data: {")
    )
    assert answer.endswith(text)
    assert lines[-2:] == [
        f": x-bastion-watermark: {expected_verdict(tokenizer, answer)}",
        "data: [DONE]",
    ]
    assert lines[-2].startswith(": x-bastion-watermark: watermarked; z=")
    # The official client ignores the comment.
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused")
    chunks = client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": text}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
