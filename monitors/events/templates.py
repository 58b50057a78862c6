"""The index template and lifecycle policy for request events, per cluster flavour.

Mappings are explicit and ``dynamic: strict``: a field the template does not map makes
the cluster refuse the document (a per-item 400 the shipper counts and logs once per
kind) instead of guessing a type. We chose strict over ``false`` because ``false`` keeps
such a field only in ``_source``, unsearchable, and nobody notices; strict turns drift
between :mod:`monitors.events.ecs` and this file into a visible error, and a test indexes
every kind of document we produce under this mapping. The one deliberate opening is
``bastion.payload`` (``enabled: false``): prompts and answers are stored as sent, never
indexed, so they cannot be searched by content and cannot break the mapping.

Only types both Elasticsearch 8/9 and OpenSearch 2/3 know are used (keyword, date, long,
float, boolean, ip, object), so the mapping is the same for both; the flavours differ in
the lifecycle (ILM for Elasticsearch, ISM for OpenSearch) and in how the template points
at it. ``TEMPLATE_VERSION`` goes into the template's ``version``: the shipper reinstalls
a template older than its own and adds the new fields to existing indices.
"""

from __future__ import annotations

from typing import Any, Literal

from monitors.events.settings import EventSettings

Flavour = Literal["elasticsearch", "opensearch"]

TEMPLATE_VERSION = 1
# Above the built-in logs-*-* template (priority 100) in Elasticsearch.
TEMPLATE_PRIORITY = 200

_KW: dict[str, Any] = {"type": "keyword", "ignore_above": 1024}
_LONG: dict[str, Any] = {"type": "long"}
_FLOAT: dict[str, Any] = {"type": "float"}
_BOOL: dict[str, Any] = {"type": "boolean"}


def _obj(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"properties": properties}


MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "@timestamp": {"type": "date"},
        "ecs": _obj(version=_KW),
        "data_stream": _obj(type=_KW, dataset=_KW, namespace=_KW),
        "event": _obj(
            kind=_KW,
            category=_KW,
            type=_KW,
            action=_KW,
            outcome=_KW,
            duration=_LONG,
            id=_KW,
            dataset=_KW,
        ),
        "http": _obj(
            request=_obj(id=_KW, method=_KW, body=_obj(bytes=_LONG)),
            response=_obj(status_code=_LONG, body=_obj(bytes=_LONG)),
        ),
        "url": _obj(path=_KW),
        "client": _obj(ip={"type": "ip"}),
        "user_agent": _obj(original=_KW),
        "user": _obj(id=_KW),
        "service": _obj(name=_KW, version=_KW, type=_KW),
        "trace": _obj(id=_KW),
        "error": _obj(type=_KW, code=_KW),
        "gen_ai": _obj(
            operation=_obj(name=_KW),
            request=_obj(model=_KW),
            response=_obj(model=_KW),
            usage=_obj(input_tokens=_LONG, output_tokens=_LONG),
        ),
        "bastion": _obj(
            kind=_KW,
            client_request_id=_KW,
            key_id=_KW,
            roles=_KW,
            tier=_KW,
            upstream=_KW,
            stream=_BOOL,
            cut=_KW,
            ratelimit=_KW,
            retries=_LONG,
            ttft_s=_FLOAT,
            tpot_s=_FLOAT,
            upstream_s=_FLOAT,
            gateway_s=_FLOAT,
            queue_wait_s=_FLOAT,
            cached_input_tokens=_LONG,
            repetition_rate=_FLOAT,
            watermark=_obj(verdict=_KW, z=_FLOAT),
            guard=_obj(
                verdicts=_obj(scanner=_KW, stage=_KW, action=_KW, score=_FLOAT, latency_s=_FLOAT),
                summary=_KW,
            ),
            payload={"type": "object", "enabled": False},
        ),
    },
}


def index_template(
    settings: EventSettings, flavour: Flavour, *, data_stream: bool = True
) -> dict[str, Any]:
    """The composable index template body (``PUT _index_template/<name>``).

    ``data_stream=False`` is for an OpenSearch without data streams: documents then go to
    one index per day (:func:`daily_index`), which ISM deletes by age without rollover.
    """
    index_settings: dict[str, Any] = {"number_of_shards": 1}
    if flavour == "elasticsearch":
        index_settings["index.lifecycle.name"] = settings.policy_name
    # OpenSearch attaches the ISM policy through the policy's own ism_template instead.
    body: dict[str, Any] = {
        "index_patterns": [settings.index_pattern],
        "priority": TEMPLATE_PRIORITY,
        "version": TEMPLATE_VERSION,
        "_meta": {"managed_by": "bastion", "description": "Bastion gateway request events"},
        "template": {"settings": index_settings, "mappings": MAPPINGS},
    }
    if data_stream:
        body["data_stream"] = {}
    return body


def ilm_policy(settings: EventSettings) -> dict[str, Any]:
    """Elasticsearch ILM: roll over daily (or at 50 GB a shard), delete after retention."""
    return {
        "policy": {
            "_meta": {"managed_by": "bastion"},
            "phases": {
                "hot": {
                    "actions": {"rollover": {"max_age": "1d", "max_primary_shard_size": "50gb"}}
                },
                "delete": {
                    "min_age": f"{settings.retention_days}d",
                    "actions": {"delete": {}},
                },
            },
        }
    }


def ism_policy(settings: EventSettings, *, data_stream: bool = True) -> dict[str, Any]:
    """OpenSearch ISM: delete an index once it is older than the retention period.

    With a data stream the backing indices also roll over daily; with daily indices no
    rollover is needed (each index is one day). The ``ism_template`` attaches the policy
    to every new index matching the pattern.
    """
    retention = f"{settings.retention_days}d"
    hot_actions: list[dict[str, Any]] = (
        [{"rollover": {"min_index_age": "1d"}}] if data_stream else []
    )
    return {
        "policy": {
            "description": "Bastion request events: delete after the retention period",
            "default_state": "hot",
            "states": [
                {
                    "name": "hot",
                    "actions": hot_actions,
                    "transitions": [
                        {"state_name": "delete", "conditions": {"min_index_age": retention}}
                    ],
                },
                {"name": "delete", "actions": [{"delete": {}}], "transitions": []},
            ],
            "ism_template": [{"index_patterns": [settings.index_pattern], "priority": 100}],
        }
    }


def daily_index(settings: EventSettings, time_us: int) -> str:
    """``logs-bastion.gateway-default-2026.12.02``: the day of the event, not of shipping,
    so a replayed document lands where its first attempt would have (``_id`` dedup)."""
    import time

    return f"{settings.data_stream}-{time.strftime('%Y.%m.%d', time.gmtime(time_us // 1_000_000))}"
