"""Request events through a real ``bastion serve`` into osmem-server, and out again on erasure."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.test_access import MASTER_KEY, bearer, make_key, secure_settings, wait_for_key
from tests.monitors.test_events_cluster import Server
from tests.support import ProcessPool, chat_body, wait_until

PROMPT = "canary-prompt-3b81 never shipped"


def test_calls_are_shipped_and_an_erased_subject_leaves_the_cluster(
    pool: ProcessPool, tmp_path: Path
) -> None:
    server = Server()
    try:
        upstream = pool.upstream("events-up", ["m1"])
        gateway = pool.gateway(
            [upstream],
            env={"BASTION_MASTER_KEY": MASTER_KEY, "BASTION_ELASTICSEARCH_URL": server.url},
            events={
                "include_subject": True,
                "flush_interval_s": 0.05,
                "spool_dir": str(tmp_path / "spool"),
            },
            **secure_settings(tmp_path / "b.db"),
        )
        alice = make_key(gateway, "--role", "app", "--subject", "alice")["key"]
        bob = make_key(gateway, "--role", "app", "--subject", "bob")["key"]
        auditor = make_key(gateway, "--role", "auditor")["key"]
        for key in (alice, bob, auditor):
            wait_for_key(gateway, key)
        for key in (alice, alice, bob):
            body = chat_body("m1", content=PROMPT)
            r = gateway.http.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert r.status_code == 200
        calls = {"term": {"url.path": "/v1/chat/completions"}}
        wait_until(lambda: len(server.docs(**calls)) == 3, 15, what="3 call events")
        docs = server.docs(**calls)
        assert sorted(d["user"]["id"] for d in docs) == ["alice", "alice", "bob"]
        assert all(d["http"]["response"]["status_code"] == 200 for d in docs)
        # The canaries (a prompt, the keys, the subject ids) are in no event, log line or
        # metric: the three telemetry outputs of the same calls.
        metrics = gateway.http.get("/metrics", headers=bearer(auditor)).text
        logs = gateway.output()
        assert "POST /v1/chat/completions 200" in logs  # the access log is on
        for secret in (PROMPT, alice, bob, auditor):
            assert secret not in str(docs) and secret not in logs and secret not in metrics
        assert "alice" not in logs and "alice" not in metrics
        assert {d["_id"] for d in docs} <= {d["http"]["request"]["id"] for d in docs}

        report = gateway.http.get("/compliance/reports/ai-act", headers=bearer(auditor)).text
        assert "Events shipped to Elasticsearch/OpenSearch: yes, delivering" in report
        assert "Request events go to: audit, metrics, events" in report

        erased = gateway.http.delete("/privacy/subjects/alice", headers=bearer(auditor))
        assert erased.status_code == 200, erased.text
        events = erased.json()["destroyed"]["events"]
        # Her two calls and the key check's GET /v1/models.
        assert events["cluster"]["deleted"] == 3
        assert [d["user"]["id"] for d in server.docs(**calls)] == ["bob"]
        assert server.docs(term={"user.id": "alice"}) == []
    finally:
        server.close()


def test_bastion_events_setup_reads_the_gateway_configuration(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.support import bastion_command

    server = Server()
    try:
        config = tmp_path / "bastion.yaml"
        config.write_text(
            "upstreams: [{name: a, url: 'http://127.0.0.1:9', models: [m]}]\n"
            f"events: {{url: '{server.url}', retention_days: 7}}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        done = subprocess.run(
            [*bastion_command(), "events", "setup", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        templates = server.get("/_index_template")["index_templates"]
        assert any(t["name"].startswith("logs-bastion") for t in templates), templates
    finally:
        server.close()
