"""Anomaly detection over the request events: per-key window features, an Isolation Forest
combined with per-key robust baselines, SHAP explanations, persistence and the runtime
(an event sink, a scorer holding a lease, the ``bastion monitor``/``anomalies`` CLIs).

docs/anomaly.md describes the features, the score, the alert budget and the evaluation.
"""
