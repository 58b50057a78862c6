"""Checks of inference/vllm_watermark.py that need torch and vLLM: run in vLLM's venv.

tests/inference/test_vllm_processor.py runs this file with ``.venv-inference/bin/python``
(the gateway's environment has neither torch nor vLLM) and fails with its output when
it exits non-zero. Each ``check_*`` function raises AssertionError on a failure.
"""

from __future__ import annotations

import base64
import os
import sys
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from inference import vllm_watermark
from inference.vllm_watermark import WatermarkLogitsProcessor, params_from_env
from inference.watermark import WatermarkParams, bias_logits, row_state

SECRET = bytes(range(32))
VOCAB = 4000
DELTA = 2.0


def _env(**extra: str) -> dict[str, str]:
    return {
        "BASTION_WATERMARK_KEYS": f"old: {base64.b64encode(SECRET[::-1]).decode()}\n"
        f"new: {base64.b64encode(SECRET).decode()}\n",
        "BASTION_WATERMARK__DELTA": str(DELTA),
        **extra,
    }


def _processor(**env: str) -> WatermarkLogitsProcessor:
    os.environ.clear()
    os.environ.update(_env(**env))
    config: Any = SimpleNamespace(speculative_config=None)
    return WatermarkLogitsProcessor(config, torch.device("cpu"), False)


def _reference(params: WatermarkParams, logits: torch.Tensor, prev: list[int]) -> np.ndarray:
    return bias_logits(params, logits.numpy().astype(np.float64), np.array(prev))


def _added(index: int, prompt: list[int], output: list[int], **xargs: Any) -> tuple[Any, ...]:
    params = SamplingParams(extra_args=xargs or None)
    return (index, params, prompt, output)


def check_generation_key_is_the_last_listed_unless_chosen() -> None:
    key_id, params = params_from_env(_env())
    assert key_id == "new"
    assert params == WatermarkParams.from_secret(SECRET, "new", delta=DELTA)
    key_id, _ = params_from_env(_env(BASTION_WATERMARK__GENERATION_KEY_ID="old"))
    assert key_id == "old"


def check_bad_environment_is_refused_with_the_variable_named() -> None:
    for env, needle in [
        ({"BASTION_WATERMARK_KEYS": ""}, "no watermark keys"),
        (_env(BASTION_WATERMARK__GAMMA="lots"), "BASTION_WATERMARK__GAMMA"),
        (_env(BASTION_WATERMARK__DELTA="50"), "BASTION_WATERMARK__DELTA"),
        (_env(BASTION_WATERMARK__GENERATION_KEY_ID="nope"), "'nope' is not among"),
        (_env(BASTION_WATERMARK__KEYS_FILE="/nowhere/keys"), "cannot read /nowhere/keys"),
    ]:
        try:
            params_from_env(env)
        except ValueError as exc:
            assert needle in str(exc), (needle, str(exc))
        else:
            raise AssertionError(f"accepted {env}")


def check_bias_matches_the_numpy_reference_for_every_row() -> None:
    proc = _processor()
    prompts = [[5, 17], [9], [3999, 0, 42]]
    outputs: list[list[int]] = [[], [123], [7, 8]]
    proc.update_state(BatchUpdate(3, [], [_added(i, prompts[i], outputs[i]) for i in range(3)], []))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    got = proc.apply(logits.clone())
    prev = [17, 123, 8]  # the prompt's last token until something was generated
    expected = _reference(proc.params, logits, prev)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    green = (got - logits).numpy() > DELTA / 2
    assert 0.22 < green.mean() < 0.28, green.mean()  # gamma 0.25 of the vocabulary
    # The live output list moves on: the next step reads the new last token.
    outputs[0].append(77)
    got = proc.apply(logits.clone())
    assert np.allclose(got[0].numpy(), _reference(proc.params, logits[:1], [77])[0], atol=1e-5)


def check_opted_out_rows_are_untouched_and_moves_are_followed() -> None:
    proc = _processor()
    added = [
        _added(0, [1], [10]),
        _added(1, [1], [11], bastion_watermark="off"),
        _added(2, [1], [12]),
    ]
    proc.update_state(BatchUpdate(3, [], added, []))
    logits = torch.zeros(3, VOCAB)
    got = proc.apply(logits.clone())
    assert torch.count_nonzero(got[1]) == 0, "an opted-out row was biased"
    assert np.allclose(got[2].numpy(), _reference(proc.params, logits[2:], [12])[0])
    # Row 0 finishes; row 2 moves into slot 0 (vLLM condenses its batch).
    proc.update_state(BatchUpdate(2, [0], [], [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    got = proc.apply(torch.zeros(2, VOCAB))
    assert np.allclose(got[0].numpy(), _reference(proc.params, logits[:1], [12])[0])
    assert torch.count_nonzero(got[1]) == 0
    # A swap, then a new request replacing the opted-out one in slot 1.
    proc.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    got = proc.apply(torch.zeros(2, VOCAB))
    assert torch.count_nonzero(got[0]) == 0
    assert np.allclose(got[1].numpy(), _reference(proc.params, logits[:1], [12])[0])
    proc.update_state(BatchUpdate(2, [], [_added(0, [4], [99])], []))
    got = proc.apply(torch.zeros(2, VOCAB))
    assert np.allclose(got[0].numpy(), _reference(proc.params, logits[:1], [99])[0])


def check_row_blocks_cover_large_batches() -> None:
    proc = _processor()
    rows = vllm_watermark.ROW_BLOCK * 2 + 3
    prev = [(i * 7919) % VOCAB for i in range(rows)]
    proc.update_state(BatchUpdate(rows, [], [_added(i, [prev[i]], []) for i in range(rows)], []))
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(2))
    got = proc.apply(logits.clone())
    assert np.allclose(got.numpy(), _reference(proc.params, logits, prev), atol=1e-5)


def check_compiled_kernel_gives_the_same_logits() -> None:
    """torch.compile (the GPU default) must capture the whole mask as one graph.

    This machine has no C++ compiler for inductor's CPU code and no GPU for Triton, so
    the graph is captured by dynamo (fullgraph: any break fails) and run by the
    ``aot_eager`` backend, through AOT autograd's decomposition, which must keep the bits.
    """
    proc = _processor()
    kernel = vllm_watermark._choose_kernel(torch.device("cpu"), "on", backend="aot_eager")
    states = row_state_of(proc, [i * 31 for i in range(5)])
    words = proc._vocabulary_words(VOCAB)
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3))
    eager = vllm_watermark.add_green_bias(logits, states, words, proc.params.threshold, DELTA)
    assert torch.equal(kernel(logits, states, words, proc.params.threshold, DELTA), eager)
    # Dynamic shapes: another batch size and vocabulary reuse the graph.
    states = row_state_of(proc, [1, 2])
    words = proc._vocabulary_words(VOCAB + 64)
    logits = torch.randn(2, VOCAB + 64, generator=torch.Generator().manual_seed(4))
    eager = vllm_watermark.add_green_bias(logits, states, words, proc.params.threshold, DELTA)
    assert torch.equal(kernel(logits, states, words, proc.params.threshold, DELTA), eager)
    try:
        vllm_watermark._choose_kernel(torch.device("cpu"), "sometimes")
    except ValueError as exc:
        assert "BASTION_VLLM_WATERMARK_COMPILE" in str(exc)
    else:
        raise AssertionError("accepted a bad compile setting")


def row_state_of(proc: WatermarkLogitsProcessor, prev: list[int]) -> torch.Tensor:
    return row_state(proc.params.key, torch.tensor(prev, dtype=torch.int64))[:, None]


def check_only_the_off_value_is_accepted() -> None:
    WatermarkLogitsProcessor.validate_params(
        SamplingParams(extra_args={"bastion_watermark": "off"})
    )
    WatermarkLogitsProcessor.validate_params(SamplingParams())
    for value in ("on", 0, "OFF"):
        try:
            WatermarkLogitsProcessor.validate_params(
                SamplingParams(extra_args={"bastion_watermark": value})
            )
        except ValueError as exc:
            assert "bastion_watermark" in str(exc)
        else:
            raise AssertionError(f"accepted bastion_watermark={value!r}")


def check_speculative_decoding_is_refused() -> None:
    os.environ.update(_env())
    config: Any = SimpleNamespace(speculative_config=object())
    try:
        WatermarkLogitsProcessor(config, torch.device("cpu"), False)
    except ValueError as exc:
        assert "speculative" in str(exc)
    else:
        raise AssertionError("started with speculative decoding")


def main() -> int:
    checks: list[tuple[str, Callable[[], None]]] = [
        (name, fn) for name, fn in globals().items() if name.startswith("check_")
    ]
    only = set(sys.argv[1:])
    failed = 0
    for name, fn in checks:
        if only and name not in only:
            continue
        try:
            fn()
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
        else:
            print(f"ok   {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
