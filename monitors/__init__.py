"""Metrics, event shipping and anomaly detection: fed by the gateway, never importing it."""
