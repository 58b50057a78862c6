"""Grafana dashboards and Prometheus rules as code.

``python -m monitors.dashboards build`` (or ``bastion dashboards build``) writes the
dashboards' JSON and the rule files under ``dashboards/``; ``bastion dashboards push``
sends the dashboards to a running Grafana. The SLOs both share live in ``slo``.
"""
