"""True and false positive rates of the watermark on the dev model, like the paper's table.

Kirchenbauer et al. (ICML 2023) report, for multinomial sampling, how often a z-test at
z = 4 finds the watermark in T generated tokens (TPR) and wrongly finds it in unmarked
text (FPR), for several delta at gamma 0.25. This runs the same experiment end to end on
this repository's parts: vLLM's CPU build serving the dev model with Bastion's logits
processor (``inference/vllm_watermark.py``) at delta 1, 2 and 5, one vLLM start per delta;
for each, N watermarked completions and N completions from the same model with the
processor opted out (``vllm_xargs.bastion_watermark = off``), each of 200 tokens
(``ignore_eos``), prompts taken from ``inference/dev_corpus.txt``, temperature 1.

Each completion is scored on its first T = 50, 100, 200 tokens two ways: on the token ids
vLLM sampled (the paper's setting: every one of the T tokens scored, the first against the
prompt's last token) and on the text, re-tokenized with the model's tokenizer as the
gateway does (``x-bastion-watermark``). Repeated bigrams are counted once, as in the
gateway. The dev model has random weights, so its next-token distributions are close to
flat (high entropy): the watermark is easy to embed, and TPR here is an upper bound for
real models, whose low-entropy stretches carry less signal (the paper's Fig. 2).

    .venv/bin/python bench/watermark_table.py [--samples 200] [--deltas 1 2 5]

Needs ``.venv-inference`` (``bastion inference install``). Takes about 5 minutes on 2
cores. Nothing here is run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from inference.dev_model import build_dev_model  # noqa: E402
from inference.environment import DEFAULT_VENV, is_installed, python_of  # noqa: E402
from inference.launch import running_tier, watermark_environment  # noqa: E402
from inference.settings import InferenceSettings  # noqa: E402
from inference.watermark import WatermarkParams, derive_key, score  # noqa: E402

GAMMA, Z_THRESHOLD = 0.25, 4.0
LENGTHS = (50, 100, 200)
KEY_ID = "bench"
SECRET = bytes(range(7, 39))
CONCURRENCY = 32


@dataclass
class Sample:
    prompt_last: int
    token_ids: list[int]
    text: str


async def generate(url: str, prompts: list[str], marked: bool, length: int) -> list[Sample]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> Sample:
        body: dict[str, object] = {
            "model": "dev-model",
            "prompt": prompt,
            "max_tokens": length,
            "temperature": 1.0,
            "seed": i * 2 + int(marked),
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if not marked:
            body["vllm_xargs"] = {"bastion_watermark": "off"}
        async with limit:
            r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        answer = r.json()
        choice = answer["choices"][0]
        prompt_ids = answer["choices"][0].get("prompt_token_ids") or answer.get("prompt_token_ids")
        return Sample(int(prompt_ids[-1]), [int(t) for t in choice["token_ids"]], choice["text"])

    # vLLM's server drops idle keep-alive connections after 5 s: expire ours before that.
    limits = httpx.Limits(max_connections=CONCURRENCY, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))


def z_on_ids(params: WatermarkParams, sample: Sample, length: int) -> float:
    ids = np.array([sample.prompt_last, *sample.token_ids[:length]], dtype=np.int64)
    return score(params, ids).z_score


def z_on_text(params: WatermarkParams, tokenizer: Tokenizer, sample: Sample, length: int) -> float:
    text = tokenizer.decode(sample.token_ids[:length])
    ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return score(params, ids).z_score


def rates(zs: list[float]) -> tuple[float, float]:
    """Share at or above the threshold, and the mean z."""
    return float(np.mean(np.array(zs) >= Z_THRESHOLD)), float(np.mean(zs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="completions per cell")
    parser.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    if not is_installed(args.venv):
        print(f"{args.venv}: not installed; run: bastion inference install", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bastion-wm-table-"))
    vllm_log = (work / "vllm.log").open("w")
    console = Console(file=vllm_log, width=200)  # vLLM's output, for when something fails
    print(f"vLLM's output goes to {work / 'vllm.log'}", file=sys.stderr)
    model_dir = work / "dev-model"
    build_dev_model(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    keys_file = work / "keys"
    keys_file.write_text(f"{KEY_ID}: {base64.b64encode(SECRET).decode()}\n")
    lines = [
        line.strip()
        for line in (ROOT / "inference" / "dev_corpus.txt").read_text().splitlines()
        if len(line.split()) >= 4
    ]
    prompts = [" ".join(lines[i % len(lines)].split()[:8]) for i in range(args.samples)]
    max_len = max(LENGTHS)
    settings = InferenceSettings(
        python=python_of(args.venv).absolute(),
        port=args.port,
        model=model_dir,
        served_model_name="dev-model",
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        gpu_memory_utilization=0.2,
        watermark=True,
    )
    rows: list[tuple[float, int, str, float, float, float, float]] = []
    started = time.monotonic()
    for delta in args.deltas:
        params = WatermarkParams(key=derive_key(SECRET, KEY_ID), gamma=GAMMA, delta=delta)
        env = watermark_environment(keys_file, KEY_ID, GAMMA, delta, environ={})
        os.environ.pop("BASTION_WATERMARK_KEYS", None)
        print(f"delta {delta}: starting vLLM ...", file=sys.stderr, flush=True)
        with running_tier(settings, console, env):
            url = f"http://127.0.0.1:{args.port}"
            t0 = time.monotonic()
            marked = asyncio.run(generate(url, prompts, True, max_len))
            unmarked = asyncio.run(generate(url, prompts, False, max_len))
            took = time.monotonic() - t0
            print(
                f"  {2 * len(prompts) * max_len / took:,.0f} tokens/s generated",
                file=sys.stderr,
                flush=True,
            )
        for length in LENGTHS:
            for how in ("ids", "text"):
                if how == "ids":
                    zw = [z_on_ids(params, s, length) for s in marked]
                    zu = [z_on_ids(params, s, length) for s in unmarked]
                else:
                    zw = [z_on_text(params, tokenizer, s, length) for s in marked]
                    zu = [z_on_text(params, tokenizer, s, length) for s in unmarked]
                tpr, mean_w = rates(zw)
                fpr, mean_u = rates(zu)
                rows.append((delta, length, how, tpr, fpr, mean_w, mean_u))

    print(
        f"\nWatermark on the dev model: gamma {GAMMA}, z threshold {Z_THRESHOLD}, "
        f"{args.samples} watermarked + {args.samples} unwatermarked completions per delta, "
        f"multinomial sampling at temperature 1 ({time.monotonic() - started:.0f} s)\n"
    )
    print("| delta | T | scored on | TPR | FPR | mean z (marked) | mean z (unmarked) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for delta, length, how, tpr, fpr, mean_w, mean_u in rows:
        cells = [f"{delta:g}", str(length), how, f"{tpr:.3f}", f"{fpr:.3f}"]
        cells += [f"{mean_w:.2f}", f"{mean_u:.2f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
