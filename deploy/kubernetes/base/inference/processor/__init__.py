"""The vLLM inference tier: launch configuration, watermark logits processor, dev model."""
