"""Structured logs: ECS JSON lines, the request id on every line, the access line, privacy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from monitors.access_log import AccessLogSink, access_document
from monitors.logs import (
    ConsoleFormatter,
    ECSFormatter,
    LoggingSettings,
    RequestIdFilter,
    logging_config,
    request_id_var,
)
from monitors.request_event import GuardVerdict, RequestEvent
from tests.support import REPO_ROOT

CANARY = "canary-51d0e2"


class Captured:
    def __init__(self, logger: logging.Logger, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.handler.addFilter(RequestIdFilter())
        self.logger = logger

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    logger = logging.getLogger(f"bastion.test.{request.node.name}")
    cap = Captured(logger, ECSFormatter())
    logger.addHandler(cap.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield cap
    logger.removeHandler(cap.handler)


def model_call(**fields: object) -> RequestEvent:
    base: dict[str, object] = {
        "time_us": 1_764_670_000_123_456, "request_id": "req-abc", "route": "/v1/chat/completions",
        "key_id": "key_1234", "roles": ("app",), "tier": "standard", "model": "dev-model",
        "model_served": "dev-model", "upstream": "u1", "stream": True, "ratelimit": "allowed",
        "status": 200, "prompt_tokens": 11, "completion_tokens": 20, "duration_s": 0.25,
        "ttft_s": 0.05, "upstream_s": 0.24, "bytes_in": 120, "bytes_out": 900,
        "subject_id": CANARY, "client_ip": CANARY, "user_agent": CANARY,
        "payload": {"prompt": CANARY, "answer": CANARY},
        "guard_verdicts": [GuardVerdict("pii", "input", "redact", 0.9, 0.001)],
    }  # fmt: skip
    base.update(fields)
    return RequestEvent(**base)  # type: ignore[arg-type]


def test_json_lines_carry_the_request_id_of_their_own_request(captured: Captured) -> None:
    async def serve(request_id: str) -> None:
        request_id_var.set(request_id)
        captured.logger.info("start %s", request_id)
        await asyncio.sleep(0.01)  # the other request logs in between
        captured.logger.warning("end")

    async def main() -> None:
        await asyncio.gather(serve("req-1"), serve("req-2"))

    asyncio.run(main())
    captured.logger.info("outside a request")
    lines = captured.lines()
    assert len(lines) == 5
    by_message = {(line["message"], line["http"]["request"]["id"]) for line in lines[:4]}  # type: ignore[index]
    assert by_message == {("start req-1", "req-1"), ("end", "req-1"),
                          ("start req-2", "req-2"), ("end", "req-2")}  # fmt: skip
    first = lines[0]
    assert first["log.level"] == "info" and first["ecs.version"] == "9.0.0"
    assert first["service"] == {"name": "bastion"}
    assert first["@timestamp"].endswith("Z")  # type: ignore[union-attr]
    assert "http" not in lines[4]
    assert "log" in first and "original" not in first["log"]  # type: ignore[operator]


def test_an_exception_goes_to_error_fields(captured: Captured) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        captured.logger.exception("failed")
    (line,) = captured.lines()
    assert line["error"]["type"] == "ValueError"  # type: ignore[index]
    assert "boom" in line["error"]["message"]  # type: ignore[index]
    assert "raise ValueError" in line["error"]["stack_trace"]  # type: ignore[index]


def test_the_access_line_is_ecs_and_leaves_personal_data_out(captured: Captured) -> None:
    sink = AccessLogSink(LoggingSettings(), logger=captured.logger)
    sink.offer(model_call())
    sink.offer(model_call(request_id="req-401", kind="refusal", status=401, model=None,
                          error_type="invalid_api_key", duration_s=0.0004))  # fmt: skip
    sink.close()
    ok, refused = captured.lines()
    assert ok["message"] == "POST /v1/chat/completions 200 250.0ms model=dev-model"
    assert ok["@timestamp"] == "2025-12-02T10:06:40.123Z"
    assert ok["event"] == {"kind": "event", "category": ["web"], "type": ["access"],
                           "outcome": "success", "duration": 250_000_000}  # fmt: skip
    assert ok["http"] == {"request": {"id": "req-abc", "method": "POST", "bytes": 120},
                          "response": {"status_code": 200, "bytes": 900}}  # fmt: skip
    assert ok["url"] == {"path": "/v1/chat/completions"}
    assert ok["gen_ai"] == {"request": {"model": "dev-model"}, "response": {"model": "dev-model"},
                            "usage": {"input_tokens": 11, "output_tokens": 20}}  # fmt: skip
    bastion = ok["bastion"]
    assert bastion["key_id"] == "key_1234" and bastion["ttft_s"] == 0.05  # type: ignore[index]
    assert bastion["gateway_s"] == pytest.approx(0.01)  # type: ignore[index]
    assert bastion["guards"] == [{"scanner": "pii", "stage": "input", "action": "redact"}]  # type: ignore[index]
    assert refused["event"]["outcome"] == "failure"  # type: ignore[index]
    assert refused["error"] == {"type": "invalid_api_key"}
    assert refused["http"]["request"]["id"] == "req-401"  # type: ignore[index]
    text = captured.stream.getvalue()
    assert CANARY not in text
    for field in ("client", "user", "user_agent"):
        assert field not in ok


def test_debug_personal_data_puts_them_in(captured: Captured) -> None:
    document = access_document(model_call(), personal_data=True)
    assert document["client"] == {"ip": CANARY}
    assert document["user"] == {"id": CANARY}
    assert document["user_agent"] == {"original": CANARY}
    assert document["bastion"]["payload"] == {"prompt": CANARY, "answer": CANARY}


def test_the_writer_thread_writes_without_a_flush(captured: Captured) -> None:
    sink = AccessLogSink(LoggingSettings(), logger=captured.logger, interval_s=0.01)
    sink.offer(model_call(request_id="req-thread"))
    deadline = time.monotonic() + 5
    while not captured.stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.close()
    (line,) = captured.lines()
    assert line["http"]["request"]["id"] == "req-thread"  # type: ignore[index]


def test_access_log_off_writes_nothing_and_a_full_queue_counts_drops(captured: Captured) -> None:
    off = AccessLogSink(LoggingSettings(access_log=False), logger=captured.logger)
    off.offer(model_call())
    off.close()
    assert captured.stream.getvalue() == ""
    before = REGISTRY.get_sample_value("bastion_event_sink_dropped_total", {"sink": "access_log"})
    small = AccessLogSink(LoggingSettings(), logger=captured.logger, capacity=2, interval_s=60)
    for _ in range(5):
        small.offer(model_call())
    after = REGISTRY.get_sample_value("bastion_event_sink_dropped_total", {"sink": "access_log"})
    assert after - (before or 0) == 3
    small.close()
    assert len(captured.lines()) == 2


def test_console_format_is_one_readable_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("bastion.test.console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = request_id_var.set("req-console")
        logger.warning("hello")
        request_id_var.reset(token)
        logger.warning("bye")
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("WARNING bastion.test.console [req-console]: hello")
    assert second.endswith("[-]: bye")


def test_settings_are_strict_and_resolve_auto() -> None:
    assert LoggingSettings().resolved_format(dev=False) == "json"
    assert LoggingSettings().resolved_format(dev=True) == "console"
    assert LoggingSettings(format="json").resolved_format(dev=True) == "json"
    with pytest.raises(ValueError):
        LoggingSettings(format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LoggingSettings(acces_log=False)  # type: ignore[call-arg]


# Applies the configuration to a fresh process, as uvicorn does with log_config=, and logs
# through uvicorn's loggers, the root logger and the access logger.
DICTCONFIG = textwrap.dedent(
    """
    import json, logging, logging.config, sys
    from monitors.logs import LoggingSettings, logging_config, request_id_var
    settings = LoggingSettings(**json.loads(sys.argv[1]))
    logging.config.dictConfig(logging_config(settings, dev=sys.argv[2] == "dev"))
    request_id_var.set("req-9")
    logging.getLogger("uvicorn.error").info("Application startup complete.",
                                            extra={"color_message": "\\x1b[32mcolour"})
    logging.getLogger("uvicorn.access").info('%s - "GET /x?q=secret HTTP/1.1" 200', "1.2.3.4")
    logging.getLogger("gateway.app").debug("debug line")
    logging.getLogger("gateway.app").warning("warned")
    logging.getLogger("bastion.access").info("access line")
    import warnings
    warnings.warn("old API", DeprecationWarning, stacklevel=1)
    """
)


def run_config(settings: dict[str, object], mode: str = "serve") -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    out = subprocess.run(
        [sys.executable, "-c", DICTCONFIG, json.dumps(settings), mode],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stderr.splitlines()


def test_the_dictconfig_puts_uvicorn_and_the_app_in_one_json_format() -> None:
    lines = [json.loads(line) for line in run_config({})]
    messages = [line["message"] for line in lines]
    # uvicorn's own access line is off (raw path and query); debug is below "info".
    assert messages[:3] == ["Application startup complete.", "warned", "access line"]
    assert "DeprecationWarning: old API" in messages[3]  # Python's warnings: JSON too
    assert all(line["http"]["request"]["id"] == "req-9" for line in lines)
    assert "color_message" not in lines[0]
    assert lines[0]["log"]["logger"] == "uvicorn.error"


def test_the_dictconfig_level_access_switch_and_console() -> None:
    lines = [json.loads(line) for line in run_config({"level": "warning", "access_log": False})]
    assert [line["message"] for line in lines][:1] == ["warned"]
    assert len(lines) == 2  # and the warning
    lines = [json.loads(line) for line in run_config({"level": "warning"})]
    assert [line["message"] for line in lines][:2] == ["warned", "access line"]  # info, but on
    console = run_config({}, mode="dev")
    assert len(console) >= 4 and console[1].endswith("WARNING gateway.app [req-9]: warned")


def test_logging_config_document_is_complete_for_uvicorn() -> None:
    config = logging_config(LoggingSettings())
    # uvicorn writes use_colors into these two when it is given a colour choice.
    assert {"default", "access"} <= set(config["formatters"])


# A real uvicorn with two spawned workers and the options above: every line it and the
# app write is JSON, and a request's lines carry its id.
UVICORN = textwrap.dedent(
    """
    import logging, sys, uvicorn
    from monitors.logs import LoggingSettings, request_id_var, uvicorn_log_options

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        request_id_var.set("req-" + scope["path"].strip("/"))
        logging.getLogger("gateway.app").warning("serving")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    if __name__ == "__main__":
        uvicorn.run("uvicorn_app:app", port=int(sys.argv[1]),
                    workers=2, **uvicorn_log_options(LoggingSettings()))
    """
)


def test_uvicorn_with_two_workers_logs_json_lines(tmp_path: object) -> None:
    from pathlib import Path

    import httpx

    from tests.support import free_port, wait_until

    directory = Path(str(tmp_path))
    (directory / "uvicorn_app.py").write_text(UVICORN)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONPATH"] = f"{directory}:{REPO_ROOT}"
    log = directory / "uvicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "uvicorn_app.py", str(port)],
            cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/one", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 30, interval=0.2, what="uvicorn")
        httpx.get(f"http://127.0.0.1:{port}/two", headers={"connection": "close"}, timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    loggers = {line["log"]["logger"] for line in lines}
    assert {"uvicorn.error", "gateway.app"} <= loggers
    serving = [line for line in lines if line["message"] == "serving"]
    assert {line["http"]["request"]["id"] for line in serving} >= {"req-one", "req-two"}
    assert len({line["process"]["pid"] for line in lines}) >= 2  # the parent and a worker
