"""Every Bastion Prometheus metric, defined once on prometheus_client's default registry.

Python imports a module once per process, so defining the metrics at module level here is
safe; defining them next to their users risks a second registration (``Duplicated
timeseries``) when code is reloaded or a module is imported under two names. New metrics
belong in this file, with help text, named ``bastion_<area>_<what>[_<unit>]``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RATELIMIT_BACKEND_ERRORS = Counter(
    "bastion_ratelimit_backend_errors_total",
    "Rate-limit backend (Redis) calls that failed; each one was answered by the "
    "configured failure mode (open: allowed, closed: refused with 503).",
)

RATELIMIT_BACKEND_UP = Gauge(
    "bastion_ratelimit_backend_up",
    "1 when the last rate-limit backend (Redis) call succeeded, 0 when it failed.",
)

WATERMARK_VERDICTS = Counter(
    "bastion_watermark_verdicts_total",
    "Proxied chat/completions answers scored for the inference tier's watermark, by "
    "verdict: watermarked (z at or above watermark.z_threshold) or absent. A drop in the "
    "watermarked share means answers no longer come from the watermarking tier.",
    ["verdict"],
)
for _verdict in ("watermarked", "absent"):
    WATERMARK_VERDICTS.labels(_verdict)  # both series exist from the start, at 0
