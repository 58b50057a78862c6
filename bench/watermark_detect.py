"""How fast does the gateway score a text for the watermark? Tokens per second.

Measures, side by side from one run, the pure scorer (inference/watermark.py, the token
ids given) and the gateway's whole check (gateway/watermark/: tokenize the text
with HF ``tokenizers``, then score it under every configured key), for a short answer
(200 tokens) and a long one (100,000 tokens), against the target of 1,000,000 tokens/s.

The tokenizer is a byte-level BPE with 32,000 tokens (the family of GPT-2's, Llama 3's
and Qwen's) trained here on the Python standard library's sources, so nothing is
downloaded; the texts are held-out parts of the same sources. On one core:

    .venv/bin/python bench/watermark_detect.py [--seconds 1.0] [--keys 3]

Nothing here is run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import WatermarkSettings  # noqa: E402
from gateway.watermark.detector import WatermarkDetector  # noqa: E402
from inference.watermark import WatermarkParams, derive_key, detect, score  # noqa: E402

TARGET = 1_000_000
VOCAB = 32_000
SHORT, LONG = 200, 100_000


def sources() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("*.py"))]


def train_tokenizer(texts: list[str], directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def rate(run: Callable[[], object], tokens: int, seconds: float) -> tuple[float, float]:
    """(tokens per second, microseconds per call) of ``run``, timed for ``seconds``."""
    run()  # warm caches
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return tokens * calls / elapsed, elapsed / calls * 1e6


def rate_async(
    run: Callable[[], Awaitable[object]], tokens: int, seconds: float
) -> tuple[float, float]:
    """:func:`rate` for a coroutine, awaited in a loop inside one running event loop."""

    async def measure() -> tuple[float, float]:
        await run()
        calls, start = 0, time.perf_counter()
        while True:
            await run()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return tokens * calls / elapsed, elapsed / calls * 1e6

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--keys", type=int, default=3, help="configured keys (rotation)")
    args = parser.parse_args()

    texts = sources()
    split = len(texts) * 4 // 5
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        directory = train_tokenizer(texts[:split], Path(tmp))
        print(
            f"tokenizer: byte-level BPE, {VOCAB:,} tokens, trained in "
            f"{time.perf_counter() - start:.1f} s on {split} stdlib modules"
        )
        keys = {f"k{i}": derive_key(bytes([i]) * 32, f"k{i}") for i in range(args.keys)}
        settings = WatermarkSettings(enabled=True, tokenizers={"bench": directory})
        detector = WatermarkDetector(settings, keys)
        tokenizer = asyncio.run(detector.tokenizer("bench"))

        held_out = "\n".join(texts[split:])
        ids = tokenizer.encode(held_out, add_special_tokens=False).ids
        offsets = tokenizer.encode(held_out, add_special_tokens=False).offsets
        assert len(ids) > LONG, "not enough held-out text"
        params = WatermarkParams(key=keys["k0"])

        rows = []
        for name, length in (("short answer", SHORT), ("long answer", LONG)):
            chunk = np.array(ids[:length], dtype=np.int64)
            text = held_out[: offsets[length - 1][1]]
            n = len(tokenizer.encode(text, add_special_tokens=False).ids)

            def whole(text: str = text) -> Awaitable[object]:
                return detector.score_texts("bench", [text], in_thread=False)

            def encode_only(text: str = text) -> object:
                return tokenizer.encode_batch_fast([text], add_special_tokens=False)

            measured = {
                "scorer, 1 key": rate(lambda c=chunk: score(params, c), length, args.seconds),
                f"scorer, {args.keys} keys": rate(
                    lambda c=chunk: detect(keys, params, c), length, args.seconds
                ),
                "tokenize only": rate(encode_only, n, args.seconds),
                f"tokenize + score, {args.keys} keys": rate_async(whole, n, args.seconds),
            }
            rows.append((name, length, measured))

    columns = list(rows[0][2])
    width = max(len(c) for c in columns) + 2
    print(f"\nwatermark detection, tokens/s (target {TARGET:,}); in brackets: µs per text\n")
    print(f"{'text':<14}{'tokens':>9}  " + "".join(f"{c:>{width + 10}}" for c in columns))
    for name, length, measured in rows:
        cells = "".join(
            f"{f'{tps:,.0f} ({us:,.0f})':>{width + 10}}" for tps, us in measured.values()
        )
        print(f"{name:<14}{length:>9,}  {cells}")
    worst = min(tps for _, _, m in rows for label, (tps, _) in m.items() if label.startswith("s"))
    verdict = "meets" if worst >= TARGET else "MISSES"
    print(f"\nslowest pure scorer: {worst:,.0f} tokens/s: {verdict} the target of {TARGET:,}")
    whole = min(m[columns[-1]][0] for _, _, m in rows)
    print(f"with tokenization: {whole:,.0f} tokens/s at worst (tokenizers' BPE sets the pace)")


if __name__ == "__main__":
    main()
