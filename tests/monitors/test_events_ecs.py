"""ECS documents, the template's mappings, the settings and the Kibana objects (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from monitors.events.cluster import _ism_retention
from monitors.events.ecs import iso_timestamp, to_document
from monitors.events.settings import EventSettings, cluster_auth
from monitors.events.templates import MAPPINGS, daily_index, ilm_policy, index_template, ism_policy
from monitors.request_event import GuardVerdict, RequestEvent

REPO = Path(__file__).resolve().parents[2]
PROMPT = "tell me the canary-prompt-7f3a secret"
ANSWER = "the canary-answer-91bc"


def full_event(**changes: Any) -> RequestEvent:
    """A model call with every field set, personal data included."""
    event = RequestEvent(
        time_us=1_796_204_678_123_456,
        request_id="req-0001",
        route="/v1/chat/completions",
        client_request_id="client-42",
        key_id="key-abc",
        roles=("app", "data_scientist"),
        tier="gold",
        subject_id="subject-canary-5d1e",
        client_ip="203.0.113.9",
        user_agent="OpenAI/Python 1.50.0",
        model="tiny",
        model_served="tiny-v2",
        upstream="vllm-a",
        stream=True,
        ratelimit="allowed",
        guard_verdicts=[
            GuardVerdict("pii", "input", "redact", 0.9, 0.0012),
            GuardVerdict("injection", "output", "pass", 0.1, 0.0003),
        ],
        status=200,
        prompt_tokens=12,
        completion_tokens=30,
        cached_tokens=4,
        bytes_in=345,
        bytes_out=2345,
        watermark="watermarked",
        watermark_z=5.5,
        repetition_rate=0.05,
        duration_s=1.25,
        ttft_s=0.2,
        upstream_s=1.2,
        queue_wait_s=0.003,
        retries=1,
        payload={"prompt": PROMPT, "answer": ANSWER},
    )
    for key, value in changes.items():
        setattr(event, key, value)
    return event


def event_kinds() -> list[RequestEvent]:
    """A model call, a refusal, a stream cut, an upstream failure, an API call."""
    return [
        full_event(),
        RequestEvent(
            time_us=1_796_204_678_200_000,
            request_id="req-0002",
            route="other",
            method="GET",
            kind="refusal",
            status=401,
            error_type="invalid_api_key",
            duration_s=0.0004,
        ),
        full_event(request_id="req-0003", cut="client_gone", status=200, completion_tokens=3),
        full_event(
            request_id="req-0004",
            status=502,
            error_type="upstream_unavailable",
            cut="upstream_failed",
            upstream_s=None,
            ttft_s=None,
            completion_tokens=None,
            watermark=None,
            watermark_z=None,
            guard_verdicts=[],
        ),
        RequestEvent(
            time_us=1_796_204_679_000_000,
            request_id="req-0005",
            route="/privacy/subjects/{subject_id}",
            method="DELETE",
            kind="api",
            key_id="key-officer",
            roles=("auditor",),
            status=200,
            duration_s=0.02,
        ),
    ]


def leaf_paths(doc: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            paths |= leaf_paths(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                paths |= leaf_paths(item, path + ".")
        else:
            paths.add(path)
    return paths


def mapped(path: str) -> bool:
    """Whether the template maps ``path`` (a field inside ``enabled: false`` counts)."""
    node: dict[str, Any] = MAPPINGS
    for part in path.split("."):
        properties = node.get("properties")
        if properties is None or part not in properties:
            return False
        node = properties[part]
        if node.get("enabled") is False:  # bastion.payload: kept in _source, not indexed
            return True
    return "type" in node


ALL_ON = EventSettings(
    url="http://127.0.0.1:9",
    payloads=True,
    include_subject=True,
    include_client_ip=True,
    include_user_agent=True,
)


def test_every_field_of_every_kind_is_mapped() -> None:
    for event in event_kinds():
        doc = to_document(event, ALL_ON)
        unmapped = {p for p in leaf_paths(doc) if not mapped(p)}
        assert not unmapped, (event.request_id, unmapped)


def test_model_call_document() -> None:
    doc = to_document(full_event(), ALL_ON)
    assert doc["@timestamp"] == "2026-12-02T09:44:38.123456Z"
    assert doc["event"]["duration"] == 1_250_000_000  # nanoseconds
    assert doc["event"]["outcome"] == "success" and doc["event"]["type"] == ["access"]
    assert doc["http"]["request"] == {"id": "req-0001", "method": "POST", "body": {"bytes": 345}}
    assert doc["http"]["response"] == {"status_code": 200, "body": {"bytes": 2345}}
    assert doc["url"]["path"] == "/v1/chat/completions"
    assert doc["gen_ai"] == {
        "operation": {"name": "chat"},
        "request": {"model": "tiny"},
        "response": {"model": "tiny-v2"},
        "usage": {"input_tokens": 12, "output_tokens": 30},
    }
    b = doc["bastion"]
    assert b["gateway_s"] == pytest.approx(0.05) and b["tpot_s"] == pytest.approx(1.05 / 29)
    assert b["guard"]["summary"] == ["injection/output/pass", "pii/input/redact"]
    assert b["watermark"] == {"verdict": "watermarked", "z": 5.5}
    assert doc["user"] == {"id": "subject-canary-5d1e"} and doc["client"]["ip"] == "203.0.113.9"
    assert b["payload"]["prompt"] == PROMPT


def test_failures_carry_error_fields() -> None:
    _, refusal, cut, failed, _ = (to_document(e, ALL_ON) for e in event_kinds())
    assert refusal["error"] == {"type": "client_error", "code": "invalid_api_key"}
    assert refusal["event"]["outcome"] == "failure" and "gen_ai" not in refusal
    assert cut["error"] == {"type": "client_gone"} and cut["bastion"]["cut"] == "client_gone"
    assert failed["error"] == {"type": "upstream_failed", "code": "upstream_unavailable"}
    assert failed["http"]["response"]["status_code"] == 502


def test_no_personal_data_or_payload_by_default() -> None:
    settings = EventSettings(url="http://127.0.0.1:9")
    text = json.dumps([to_document(e, settings) for e in event_kinds()])
    for secret in (PROMPT, ANSWER, "canary", "subject-canary-5d1e", "203.0.113.9", "OpenAI/Python"):
        assert secret not in text
    assert '"user"' not in text and '"client"' not in text and '"payload"' not in text


def test_payloads_need_the_subject() -> None:
    with pytest.raises(ValueError, match="include_subject"):
        EventSettings(url="http://x:9200", payloads=True)
    with pytest.raises(ValueError, match="extra"):
        EventSettings.model_validate({"url": "http://x:9200", "password": "hunter2"})
    with pytest.raises(ValueError, match="no '-'"):
        EventSettings(dataset="bastion-gateway")


def test_credentials_from_env_or_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    s = EventSettings(url="https://es:9200", username="bastion", password_file=tmp_path / "pw")
    assert cluster_auth(s, {}).header == "Basic YmFzdGlvbjpzM2NyZXQ="
    assert "s3cret" not in repr(s) + repr(cluster_auth(s, {}))
    env = {"BASTION_ELASTICSEARCH_API_KEY": "aWQ6a2V5"}
    assert cluster_auth(s, env).header == "ApiKey aWQ6a2V5"
    with pytest.raises(ValueError, match="no password"):
        cluster_auth(EventSettings(url="https://es:9200", username="u"), {})


def test_templates_and_policies() -> None:
    s = EventSettings(url="http://es:9200", retention_days=14)
    es = index_template(s, "elasticsearch")
    assert es["index_patterns"] == ["logs-bastion.gateway-*"] and es["data_stream"] == {}
    assert es["priority"] > 100 and es["template"]["mappings"]["dynamic"] == "strict"
    assert es["template"]["settings"]["index.lifecycle.name"] == "logs-bastion.gateway-retention"
    assert ilm_policy(s)["policy"]["phases"]["delete"]["min_age"] == "14d"
    os_plain = index_template(s, "opensearch", data_stream=False)
    assert "data_stream" not in os_plain and "index.lifecycle.name" not in json.dumps(os_plain)
    ism = ism_policy(s, data_stream=False)["policy"]
    assert ism["states"][0]["transitions"][0]["conditions"] == {"min_index_age": "14d"}
    assert ism["ism_template"][0]["index_patterns"] == ["logs-bastion.gateway-*"]
    assert daily_index(s, 1_796_204_678_123_456) == "logs-bastion.gateway-default-2026.12.02"
    assert iso_timestamp(0) == "1970-01-01T00:00:00.000000Z"
    # the shipper recognises its own policy's retention when it reads it back
    assert _ism_retention(ism_policy(s)) == "14d"
    assert _ism_retention({"policy": {"states": []}}) is None


def test_kibana_objects_match_the_template() -> None:
    path = REPO / "dashboards" / "kibana" / "bastion-events.ndjson"
    objects = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    views = [o for o in objects if o["type"] == "index-pattern"]
    assert len(views) == 1
    view = views[0]
    assert view["attributes"]["title"] == EventSettings().index_pattern
    assert view["attributes"]["timeFieldName"] == "@timestamp"
    searches = [o for o in objects if o["type"] == "search"]
    assert searches, "a saved search"
    for search in searches:
        refs = {r["id"] for r in search["references"]}
        assert view["id"] in refs
        columns = search["attributes"]["columns"]
        assert columns and all(mapped(c) for c in columns), columns
