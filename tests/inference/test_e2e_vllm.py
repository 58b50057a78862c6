"""End to end against the real inference tier: vLLM (CPU build) serving the dev model
with Bastion's watermark processor, a real ``bastion serve`` with keys in front of it,
and the official ``openai`` client.

What only a real upstream proves: the processor really marks what vLLM samples and the
gateway, re-tokenizing the answer with the model's tokenizer, finds the mark; opted-out
text carries none; vLLM's own errors, streams, usage and cancellation pass through.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from inference.dev_model import build_dev_model
from tests.gateway.test_access import MASTER_KEY, make_key, secure_settings, wait_for_key
from tests.support import Gateway, ProcessPool, assert_openai_error, sse_data
from tests.vllm_tier import WATERMARK_KEYS, InferenceTier, start_tier

pytestmark = pytest.mark.timeout(300)

MODEL = "dev-model"
LONG = 200  # tokens: enough for z well above 4 at delta 2 (the paper's T = 200)
VERDICT = re.compile(r"^(watermarked|absent); z=(-?[0-9.]+)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dev-model") / "dev-model"
    build_dev_model(directory)
    return directory


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[InferenceTier]:
    tier = start_tier(tmp_path_factory.mktemp("tier"), model_dir)
    yield tier
    tier.stop()


@pytest.fixture(scope="module")
def stack(
    module_pool: ProcessPool,
    tier: InferenceTier,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Gateway, dict[str, str]]:
    database = tmp_path_factory.mktemp("e2e-vllm") / "bastion.db"
    gateway = module_pool.gateway(
        [{"name": "vllm", "url": tier.url, "models": [MODEL]}],
        env={"BASTION_MASTER_KEY": MASTER_KEY, "BASTION_WATERMARK_KEYS": WATERMARK_KEYS},
        watermark={"enabled": True, "tokenizers": {MODEL: str(model_dir)}},
        timeouts={"connect_s": 2.0, "read_s": 60.0},
        **secure_settings(database, auth={"enabled": True, "key_refresh_s": 0.2}),
    )
    keys = {role: make_key(gateway, "--role", role)["key"] for role in ("app", "data_scientist")}
    for key in keys.values():
        wait_for_key(gateway, key)
    return gateway, keys


def client(stack: tuple[Gateway, dict[str, str]], role: str = "app") -> OpenAI:
    gateway, keys = stack
    return OpenAI(base_url=gateway.base_url, api_key=keys[role], max_retries=0, timeout=60)


def verdict(header: str | None) -> tuple[str, float]:
    assert header is not None, "no x-bastion-watermark header"
    found = VERDICT.match(header)
    assert found, header
    return found.group(1), float(found.group(2))


def detect(stack: tuple[Gateway, dict[str, str]], text: str) -> dict[str, Any]:
    gateway, keys = stack
    r = gateway.http.post(
        "/v1/watermark/detect",
        json={"text": text, "model": MODEL},
        headers={"Authorization": f"Bearer {keys['data_scientist']}"},
    )
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def long_chat(c: OpenAI, **extra: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write about the sea."}],
        max_tokens=LONG,
        temperature=1.0,
        extra_body={"ignore_eos": True, **extra},
    )


def test_generated_text_is_watermarked_and_detected(stack: tuple[Gateway, dict[str, str]]) -> None:
    with client(stack) as c:
        raw = long_chat(c)
    answer = raw.parse()
    assert answer.usage.completion_tokens == LONG
    label, z = verdict(raw.headers.get("x-bastion-watermark"))
    assert (label, z >= 4) == ("watermarked", True), raw.headers.get("x-bastion-watermark")
    found = detect(stack, answer.choices[0].message.content)
    assert found["watermarked"] is True and found["z_score"] >= 4, found
    assert found["tokens"] >= LONG * 0.8 and found["p_value"] < 1e-4


def test_text_generated_without_the_processor_is_not_detected(
    stack: tuple[Gateway, dict[str, str]],
) -> None:
    """A role allowed to opt out gets unmarked text, and the detector says so."""
    zs = []
    with client(stack, "data_scientist") as c:
        for _ in range(2):
            raw = long_chat(c, vllm_xargs={"bastion_watermark": "off"})
            label, z = verdict(raw.headers.get("x-bastion-watermark"))
            assert label == "absent", raw.headers.get("x-bastion-watermark")
            found = detect(stack, raw.parse().choices[0].message.content)
            assert found["watermarked"] is False and found["z_score"] < 4, found
            zs.append(z)
    assert all(abs(z) < 4 for z in zs), zs


def test_roles_without_the_permission_cannot_opt_out(
    stack: tuple[Gateway, dict[str, str]],
) -> None:
    gateway, keys = stack
    r = gateway.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "vllm_xargs": {"bastion_watermark": "off"}},
        headers={"Authorization": f"Bearer {keys['app']}"},
    )
    assert_openai_error(r, 403, "permission_error", "permission_denied")
    assert "watermark" in r.json()["error"]["message"]


def test_vllms_own_400_passes_through(stack: tuple[Gateway, dict[str, str]]) -> None:
    """Errors vLLM raises itself reach the client unchanged, in OpenAI's shape."""
    with client(stack, "data_scientist") as c:
        with pytest.raises(openai.BadRequestError) as caught:
            c.completions.create(
                model=MODEL,
                prompt="hi",
                max_tokens=5,
                extra_body={"vllm_xargs": {"bastion_watermark": "on"}},
            )
        assert "bastion_watermark" in str(caught.value)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="hi", max_tokens=5000)


def test_stream_ends_with_the_verdict(stack: tuple[Gateway, dict[str, str]]) -> None:
    gateway, keys = stack
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "stream": True,
        "ignore_eos": True,
    }
    with gateway.http.stream(
        "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['app']}"}
    ) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    comments = [line for line in lines if line.startswith(": x-bastion-watermark:")]
    assert len(comments) == 1, lines[-5:]
    label, z = verdict(comments[0].removeprefix(": x-bastion-watermark: "))
    assert label == "watermarked" and z >= 4
    events = sse_data(lines)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if '"choices":[{' in e)
    assert detect(stack, text)["watermarked"] is True


def test_openai_client_streams_chat(stack: tuple[Gateway, dict[str, str]]) -> None:
    with client(stack) as c:
        stream = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30


async def test_concurrent_async_requests(stack: tuple[Gateway, dict[str, str]]) -> None:
    gateway, keys = stack
    async with AsyncOpenAI(
        base_url=gateway.base_url, api_key=keys["app"], max_retries=0, timeout=60
    ) as c:
        answers = await asyncio.gather(
            *(
                c.completions.create(
                    model=MODEL,
                    prompt=f"Item {i}:",
                    max_tokens=20,
                    seed=i,
                    extra_body={"ignore_eos": True},
                )
                for i in range(8)
            )
        )
    assert all(a.usage is not None and a.usage.completion_tokens == 20 for a in answers)
    assert len({a.id for a in answers}) == 8


def test_models_list_names_the_served_model(stack: tuple[Gateway, dict[str, str]]) -> None:
    with client(stack) as c:
        assert [m.id for m in c.models.list()] == [MODEL]


def test_client_disconnect_cancels_generation_in_vllm(
    stack: tuple[Gateway, dict[str, str]], tier: InferenceTier
) -> None:
    """A client that goes away mid-stream frees vLLM at once, not after max_tokens.

    Unchecked, vLLM would go on to generate all 1,000 tokens (about 3 s here).
    """
    gateway, keys = stack
    body = {"model": MODEL, "prompt": "Go on", "max_tokens": 1000, "stream": True}
    body["ignore_eos"] = True
    before = tier.metric("vllm:generation_tokens_total")
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['app']}"}
        ) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    time.sleep(1.0)
    generated = tier.metric("vllm:generation_tokens_total") - before
    time.sleep(1.0)
    assert tier.metric("vllm:generation_tokens_total") - before == generated, "still generating"
    assert generated < 200, f"{generated} tokens generated for a client that left"
    assert tier.metric("vllm:num_requests_running") == 0
