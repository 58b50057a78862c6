"""Watermark verdicts on the model's answers: tokenize the text, score it, say so.

The scheme (Kirchenbauer et al. 2023) lives in :mod:`inference.watermark`; this package
brings it the text. It answers:

- proxied non-streamed answers: ``x-bastion-watermark: watermarked; z=5.12; key=k1``
  (or ``absent; z=0.41``), and ``bastion_watermark_verdicts_total{verdict}``;
- proxied streams: the same verdict as a final SSE comment, ``: x-bastion-watermark:
  ...``, sent just before ``data: [DONE]`` (comments are ignored by SSE clients);
- ``POST /v1/watermark/detect {text, model}`` for auditors.

Where each job lives:

- :mod:`gateway.watermark.keys`: the configured keys (``parse_keys``,
  ``load_watermark_keys``), configuration errors as :class:`~gateway.config.ConfigError`;
- :mod:`gateway.watermark.detector`: :class:`WatermarkDetector` (the keys and each model's
  tokenizer, loaded on first use), :class:`AnswerCheck` (one model's check),
  ``header_value`` and :class:`TokenizerUnavailable`;
- :mod:`gateway.watermark.answer_filter`: :class:`WatermarkFilter`, the answer filter
  (``gateway.pipeline.AnswerFilter``) that puts the verdict on a call, and its source
  :class:`WatermarkFilterSource`; ``STATE_KEY``, where the audit entry finds the verdict;
- :mod:`gateway.watermark.endpoint`: ``POST /v1/watermark/detect`` (:class:`DetectRequest`,
  :class:`WatermarkEndpoint`).

The scorer sees the text's tokens, not the tokens the model sampled: re-encoding a
decoded answer mostly gives them back, and where it does not (a non-canonical
tokenization) only the few bigrams around the difference change, so the verdict holds.
Each choice and each text field (content, reasoning) is tokenized on its own: the pairs
across their boundaries were never generated one after the other.

With ``watermark.enabled: false`` no object of this package exists and the proxy does no
work at all for watermarks. Nothing is re-exported here: import from the module that
does the job (importing this package loads neither numpy nor the tokenizers).
"""
