"""The EU AI Act report: live settings and figures counted from known entries."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine

from compliance.ai_act_report import (
    SystemFacts,
    UpstreamFacts,
    measure,
    render_html,
    render_markdown,
)
from compliance.records import KEY_CREATED, AuditRecord, now_us
from tests.compliance.conftest import AppenderFactory
from tests.compliance.records import request_record

FACTS = SystemFacts(
    version="9.9.9",
    models=("dev-model", "m<script>alert(1)</script>"),
    upstreams=(UpstreamFacts("up|one", ("dev-model",), 2.0),),
    roles={"auditor": ("audit:read", "privacy:manage"), "app": ("models:call",)},
    auth_enabled=True,
    tls=False,
    client_certificates="none",
    rate_limits="10 requests/s",
    audit_enabled=True,
    audit_payloads=True,
    retention_days=90,
    checkpoint_every_entries=1000,
    checkpoint_every_s=10.0,
    database="sqlite",
    watermark_enabled=True,
    watermark_gamma=0.25,
    watermark_delta=2.0,
    watermark_z_threshold=4.0,
)


def known_entries(make_appender: AppenderFactory) -> None:
    """10 calls: 6 x 200 (3 watermarked, 1 absent, 2 unscored), 3 x 429, 1 x 502."""
    appender = make_appender("w1")
    now = now_us()
    marks: list[Any] = ["watermarked; z=5.0; key=k1"] * 3 + ["absent; z=0.4", None, None]
    for n, mark in enumerate(marks):
        appender.append(request_record(n, time_us=now - 1000, watermark=mark))
    for n in range(3):
        appender.append(request_record(10 + n, time_us=now - 1000, status=429, watermark=None))
    appender.append(request_record(20, time_us=now - 1000, status=502, watermark=None))
    appender.append(request_record(30, time_us=now - 40 * 86_400_000_000))  # out of window
    appender.append(AuditRecord(kind=KEY_CREATED, time_us=now - 1000, status=200))


def test_figures_are_counted_from_the_entries(
    engine: Engine, make_appender: AppenderFactory
) -> None:
    known_entries(make_appender)
    figures = measure(engine, days=30)
    assert figures.requests == 10
    assert figures.statuses == {"2xx": 6, "4xx": 3, "5xx": 1}
    assert figures.watermark == {"watermarked": 3, "absent": 1, "not scored": 2}
    assert figures.actions == {"key.created": 1}
    report = render_markdown(FACTS, figures, now_us())
    assert "| 2xx | 6 | 60.0 % |" in report
    assert "| 4xx | 3 | 30.0 % |" in report
    assert "| 5xx | 1 | 10.0 % |" in report
    assert "watermarked: 3 (75.0 %)" in report
    assert "gamma 0.25, delta 2, detection threshold z >= 4" in report
    assert "`9.9.9`" in report and "| up\\|one | dev-model | 2 |" in report
    assert "Input and output guards are not implemented yet" in report
    assert "Anomaly detection" in report  # an open gap
    assert "| auditor | audit:read, privacy:manage |" in report


def test_retention_below_six_months_is_warned(engine: Engine) -> None:
    figures = measure(engine, days=7)
    short = render_markdown(FACTS, figures, now_us())
    assert "> **Warning**: logs are kept 90 days" in short
    long = render_markdown(replace(FACTS, retention_days=183), figures, now_us())
    assert "Warning" not in long and "Retention: 183 days" in long
    assert "n/a (no data)" in long


def test_the_retention_schedule_is_reported_and_its_absence_is_a_gap(engine: Engine) -> None:
    figures = measure(engine, days=7)
    scheduled = render_markdown(replace(FACTS, retention_interval_s=3600), figures, now_us())
    assert "Retention: 90 days, enforced by the gateway every 1 h" in scheduled
    assert "Retention is not scheduled" not in scheduled
    manual = render_markdown(replace(FACTS, retention_interval_s=0), figures, now_us())
    assert "only when `bastion audit retention` is run" in manual
    assert "- Retention is not scheduled: run `bastion audit retention` regularly." in manual


def test_html_is_well_formed_and_escaped(engine: Engine, make_appender: AppenderFactory) -> None:
    known_entries(make_appender)
    page = render_html(render_markdown(FACTS, measure(engine), now_us()))
    assert page.startswith("<!DOCTYPE html>")
    root = ET.fromstring(page.split("\n", 1)[1])  # XHTML-compatible: parses as XML
    assert root.tag == "html"
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert next(h.text for h in root.iter("h2")) == "1. System description"
    cells = [td.text for td in root.iter("td")]
    assert "up|one" in cells
    assert root.find(".//blockquote") is not None  # the retention warning
    assert re.search(r"<strong>Warning</strong>", page)
