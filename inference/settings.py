"""The ``inference:`` section of Bastion's YAML: how to start the vLLM tier.

Pure pydantic (no torch, no vLLM): the gateway's :class:`gateway.config.Settings` embeds
it, and :func:`inference.launch.vllm_command` turns it into vLLM's command line. Paths are
checked when the tier is started (``bastion inference serve``), not when a configuration
is loaded: a gateway host has no model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# A served model name must survive vLLM's ``name=path`` LoRA syntax and OpenAI clients.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]*$"

# Flags that vllm_command() writes, and the field that sets each: extra_args may not repeat them.
MANAGED_FLAGS = {
    "--model": "model",
    "--served-model-name": "served_model_name",
    "--host": "host",
    "--port": "port",
    "--dtype": "dtype",
    "--quantization": "quantization",
    "-q": "quantization",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--max-model-len": "max_model_len",
    "--enforce-eager": "enforce_eager",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--enable-lora": "lora_adapters",
    "--lora-modules": "lora_adapters",
    "--scheduling-policy": "priority_scheduling",
    "--logits-processors": "watermark",
}


def field_error(field: str, reason: str) -> PydanticCustomError:
    """A model validator's error about one of its fields (``field`` relative to the model).

    gateway.config's error line then names the full path, ``inference.<field>: <reason>``.
    """
    return PydanticCustomError(
        "field_error", "{field}: {reason}", {"field": field, "reason": reason}
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraAdapter(_Section):
    """A LoRA adapter served as a model of its own (``--lora-modules name=path``)."""

    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)
    path: Path


class InferenceSettings(_Section):
    """The vLLM OpenAI-compatible server that ``bastion inference serve`` starts."""

    python: Path = Path(".venv-inference/bin/python")
    """The interpreter of vLLM's own virtual environment (not the gateway's)."""
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    model: Path = Path(".bastion/dev-model")
    """The model directory (config.json, tokenizer, safetensors weights)."""
    served_model_name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN
    )
    """The name clients ask for; default: the model directory's name."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    quantization: Literal["awq", "gptq", "fp8"] | None = None
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """Share of GPU memory vLLM may take (vLLM's default 0.92); on CPU builds, of RAM."""
    enforce_eager: bool = False
    """No CUDA graphs / compilation: slower decoding, much faster start (CPU dev setups)."""
    lora_adapters: list[LoraAdapter] = []
    priority_scheduling: bool = False
    """``--scheduling-policy priority``: needed before keys get a non-standard tier."""
    watermark: bool = False
    """Load Bastion's watermark logits processor (``inference.vllm_watermark``)."""
    extra_args: list[str] = []
    """Further vLLM flags, passed as they are (e.g. ``["--gpu-memory-utilization", "0.85"]``)."""
    startup_timeout_s: float = Field(default=600.0, gt=0, le=7200)
    """How long to wait for ``GET /health`` to answer 200 (large models load for minutes)."""
    stop_grace_s: float = Field(default=15.0, gt=0, le=600)
    """On stop: SIGTERM to vLLM's process group, then SIGKILL after this many seconds."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        seen = {self.served_name()}
        for i, adapter in enumerate(self.lora_adapters):
            if adapter.name in seen:
                raise field_error(
                    f"lora_adapters.{i}.name",
                    f"{adapter.name!r} is used twice "
                    "(adapters and the base model are served under distinct names)",
                )
            seen.add(adapter.name)
        for arg in self.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                raise field_error(
                    "extra_args", f"{flag} is set by Bastion; use inference.{MANAGED_FLAGS[flag]}"
                )
        return self

    def served_name(self) -> str:
        """The base model's name as clients see it."""
        return self.served_model_name or self.model.name or "model"

    def served_models(self) -> list[str]:
        """Every model name the server answers to: the base model, then the adapters."""
        return [self.served_name()] + [a.name for a in self.lora_adapters]
