"""``bastion dashboards push`` against a recording HTTP server that answers as Grafana's
HTTP API documents (folders: GET/POST/PUT /api/folders; dashboards: POST
/api/dashboards/db). No Grafana runs here: what this proves is the requests the
command sends over a real socket (method, path, authentication, JSON body) and how it
takes Grafana's answers; docs/dashboards.md lists what stays unverified."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from monitors.dashboards.cli import dashboards_app
from tests.dashboards.test_generated import EXPECTED_UIDS


class FakeGrafana:
    """Records every request; answers like Grafana 11 for a folder and dashboards."""

    def __init__(self, folder_title: str | None, dashboard_status: int = 200) -> None:
        self.folder_title = folder_title  # None: no such folder yet
        self.dashboard_status = dashboard_status
        self.requests: list[dict[str, Any]] = []
        grafana = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                entry = {
                    "method": self.command,
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "content_type": self.headers.get("Content-Type"),
                    "body": json.loads(raw) if raw else None,
                }
                grafana.requests.append(entry)
                return entry

            def do_GET(self) -> None:
                self._record()
                if self.path == "/api/folders/bastion" and grafana.folder_title is not None:
                    self._answer(200, {"uid": "bastion", "title": grafana.folder_title, "id": 7})
                else:
                    self._answer(404, {"message": "folder not found", "status": "not-found"})

            def do_POST(self) -> None:
                entry = self._record()
                if self.path == "/api/folders":
                    grafana.folder_title = entry["body"]["title"]
                    self._answer(200, {"uid": entry["body"]["uid"], "title": grafana.folder_title})
                elif self.path == "/api/dashboards/db":
                    uid = entry["body"]["dashboard"]["uid"]
                    if grafana.dashboard_status != 200:
                        self._answer(grafana.dashboard_status, {"message": "version-mismatch"})
                        return
                    self._answer(
                        200,
                        {
                            "id": 1,
                            "uid": uid,
                            "url": f"/d/{uid}/x",
                            "status": "success",
                            "version": 3,
                        },
                    )
                else:
                    self._answer(404, {"message": "not found"})

            def do_PUT(self) -> None:
                entry = self._record()
                grafana.folder_title = entry["body"]["title"]
                self._answer(200, {"uid": "bastion", "title": grafana.folder_title, "version": 2})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGrafana:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "grafana.token"
    path.write_text("glsa_test_token_0123\n")
    return path


def push(*args: str) -> Any:
    return CliRunner().invoke(dashboards_app, ["push", *args], catch_exceptions=False)


def test_push_creates_the_folder_then_every_dashboard(token_file: Path) -> None:
    with FakeGrafana(folder_title=None) as grafana:
        result = push("--url", grafana.url, "--token-file", str(token_file))
    assert result.exit_code == 0, result.output
    calls = [(r["method"], r["path"]) for r in grafana.requests]
    assert calls[:2] == [("GET", "/api/folders/bastion"), ("POST", "/api/folders")]
    assert calls[2:] == [("POST", "/api/dashboards/db")] * len(EXPECTED_UIDS)
    for request in grafana.requests:
        assert request["authorization"] == "Bearer glsa_test_token_0123"
    assert grafana.requests[1]["body"] == {"uid": "bastion", "title": "Bastion"}
    pushed = set()
    for request in grafana.requests[2:]:
        body = request["body"]
        assert request["content_type"].startswith("application/json")
        assert set(body) == {"dashboard", "folderUid", "overwrite", "message"}
        assert body["folderUid"] == "bastion" and body["overwrite"] is True
        dashboard = body["dashboard"]
        assert "id" not in dashboard  # Grafana matches on uid; an id is per instance
        assert dashboard["title"].startswith("Bastion / ") and dashboard["panels"]
        pushed.add(dashboard["uid"])
    assert pushed == EXPECTED_UIDS
    assert "folder bastion: created" in result.output
    assert f"{grafana.url}/d/bastion-gateway/x" in result.output


def test_push_renames_an_existing_folder_with_basic_auth(tmp_path: Path) -> None:
    password = tmp_path / "grafana.password"
    password.write_text("s3cret-pw\n")
    with FakeGrafana(folder_title="Old name") as grafana:
        result = push(
            "--url", grafana.url, "--user", "ops", "--password-file", str(password),
            "--folder-title", "Bastion (prod)",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    calls = [(r["method"], r["path"]) for r in grafana.requests]
    assert calls[:2] == [("GET", "/api/folders/bastion"), ("PUT", "/api/folders/bastion")]
    assert grafana.requests[1]["body"] == {"title": "Bastion (prod)", "overwrite": True}
    expected = "Basic " + base64.b64encode(b"ops:s3cret-pw").decode()
    assert {r["authorization"] for r in grafana.requests} == {expected}
    assert "folder bastion: updated" in result.output


def test_push_leaves_an_up_to_date_folder_alone(token_file: Path) -> None:
    with FakeGrafana(folder_title="Bastion") as grafana:
        result = push("--url", grafana.url, "--token-file", str(token_file))
    assert result.exit_code == 0, result.output
    assert [r["method"] for r in grafana.requests[:2]] == ["GET", "POST"]
    assert grafana.requests[1]["path"] == "/api/dashboards/db"


def test_a_refused_dashboard_is_a_clear_error(token_file: Path) -> None:
    with FakeGrafana(folder_title="Bastion", dashboard_status=412) as grafana:
        result = push("--url", grafana.url, "--token-file", str(token_file))
    assert result.exit_code == 1
    assert "version-mismatch" in result.output
    assert "glsa_test_token" not in result.output


def test_push_needs_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    result = push("--url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "--token-file" in result.output


def test_unreachable_grafana_is_a_clear_error(token_file: Path) -> None:
    from tests.support import free_port

    result = push("--url", f"http://127.0.0.1:{free_port()}", "--token-file", str(token_file))
    assert result.exit_code == 1
    assert "error:" in result.output
