"""vLLM decode throughput with and without Bastion's watermark processor (target: ≤ 3 % slower).

Runs in vLLM's environment, on whatever device vLLM uses (a GPU for the real figure)::

    .venv-inference/bin/python bench/processor_throughput.py --shape 8b [--batch 64] [--tokens 256]

It builds a model with random weights in a real model's shape (``8b``: Llama 3 8B's
layers and its 128,256-token vocabulary, float16, about 16 GB on disk; ``1b``: Llama 3.2
1B's; ``dev``: the tiny dev model's, for checking the script on a CPU), then, each in a
fresh process so that nothing is shared, runs vLLM's offline engine without and with
``inference.vllm_watermark:WatermarkLogitsProcessor`` (alternating, ``--rounds`` times
each) on the same batch of prompts (token ids; no tokenizer is loaded, since the
vocabulary is larger than any tokenizer trainable offline), ``ignore_eos`` and a fixed
number of new tokens, and prints generated tokens per second for each and the
slowdown. The vocabulary's size is what the processor's cost scales with; the weights'
values do not matter for throughput.

Nothing here is run by CI.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "dev": (128, 256, 2, 4, 4, 4000),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}
PROCESSOR = "inference.vllm_watermark:WatermarkLogitsProcessor"


def build_model(directory: Path, shape: str) -> Path:
    """config.json and random float16 weights in ``shape`` (kept between runs)."""
    import torch
    from safetensors.torch import save_file

    from inference.dev_model import DevModelShape, model_config, parameter_shapes

    if (directory / "model.safetensors").is_file():
        return directory
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[shape]
    config = model_config(
        vocab,
        DevModelShape(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=inter,
            num_hidden_layers=layers,
            max_position_embeddings=4096,
        ),
    )
    config["torch_dtype"] = "float16"
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, size in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(size, dtype=torch.float16)
        else:
            weights[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.float16)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def run_engine(
    model: Path, watermark: bool, batch: int, tokens: int, dtype: str, memory_share: float
) -> float:
    """One engine, one warm-up and one timed generate; returns generated tokens per second."""
    from vllm import LLM, SamplingParams

    if watermark:
        os.environ["BASTION_WATERMARK_KEYS"] = f"bench: {base64.b64encode(b'b' * 32).decode()}"
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        dtype=dtype,
        gpu_memory_utilization=memory_share,
        max_model_len=1024,
        logits_processors=[PROCESSOR] if watermark else None,
        seed=0,
    )
    params = SamplingParams(
        max_tokens=tokens, ignore_eos=True, temperature=1.0, seed=0, detokenize=False
    )
    prompts = [
        {"prompt_token_ids": [(i * 7 + j) % 3000 + 5 for j in range(32)]} for i in range(batch)
    ]
    llm.generate(prompts[: min(batch, 4)], SamplingParams(max_tokens=8, detokenize=False))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    took = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return generated / took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--batch", type=int, default=64, help="concurrent sequences")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sequence")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtype", default="float16", help="float32 for vLLM's CPU build")
    parser.add_argument("--memory-share", type=float, default=0.9, help="--gpu-memory-utilization")
    parser.add_argument("--child", choices=["plain", "watermark"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model_dir or Path(tempfile.gettempdir()) / f"bastion-bench-{args.shape}"
    if args.child:
        watermark = args.child == "watermark"
        rate = run_engine(model, watermark, args.batch, args.tokens, args.dtype, args.memory_share)
        print(f"RESULT {rate:.3f}")
        return 0
    print(f"building a random {args.shape} model in {model} ...", file=sys.stderr, flush=True)
    build_model(model, args.shape)
    rates: dict[str, list[float]] = {"plain": [], "watermark": []}
    for _ in range(args.rounds):
        for variant in ("plain", "watermark"):
            command = [sys.executable, __file__, "--child", variant, "--model-dir", str(model)]
            command += ["--batch", str(args.batch), "--tokens", str(args.tokens)]
            command += ["--dtype", args.dtype, "--memory-share", str(args.memory_share)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_NO_USAGE_STATS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not found:
                print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
                return 1
            rates[variant].append(float(found[0].split()[1]))
            print(f"  {variant}: {rates[variant][-1]:,.0f} tokens/s", file=sys.stderr, flush=True)
    plain, marked = max(rates["plain"]), max(rates["watermark"])
    slowdown = 1 - marked / plain
    print(
        f"\nvLLM decode throughput, {args.shape} shape, batch {args.batch}, "
        f"{args.tokens} new tokens"
    )
    print("| variant | best tokens/s | runs |\n|---|---:|---|")
    for variant, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"| {variant} | {max(values):,.0f} | {runs} |")
    verdict = "PASS" if slowdown <= 0.03 else "MISS"
    print(f"\nwatermark processor: {slowdown:.1%} slower ({verdict}: target at most 3 % slower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
