"""The access log: one ECS line per request, written from the request's event.

:class:`AccessLogSink` is the gateway's ``access_log`` event sink (``EventSink``): ``offer``
appends the event to a bounded queue and returns; a daemon thread drains the queue every
``interval_s`` and hands each line to the ``bastion.access`` logger, so a slow stderr
(a full pipe to a log collector) never stalls the event loop, and the JSON is built off
the request's path. A full queue drops the newest event and counts it in
``bastion_event_sink_dropped_total{sink="access_log"}``.

The line (:func:`access_document`) follows ECS: ``event.*`` (``event.duration`` in
nanoseconds), ``http.*``, ``url.path`` (the route template, never the raw path, which may
hold ids), ``gen_ai.*`` for the model and usage, ``error.type``, and Bastion's own fields
under ``bastion.*``. Personal data (``client.ip``, ``user_agent.original``, ``user.id``,
the payload) only with ``logging.debug_personal_data``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

from monitors import metrics
from monitors.logs import ACCESS_LOGGER, LoggingSettings
from monitors.request_event import RequestEvent


def _timestamp(time_us: int) -> str:
    moment = datetime.fromtimestamp(time_us / 1e6, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)  # microseconds, without float noise


def _compact(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def access_document(event: RequestEvent, personal_data: bool = False) -> dict[str, Any]:
    """The ECS fields of one request's access line (without the log.* and message)."""
    failed = event.status >= 400 or event.cut is not None
    document: dict[str, Any] = {
        "@timestamp": _timestamp(event.time_us),
        "event": {
            "kind": "event",
            "category": ["web"],
            "type": ["access"],
            "outcome": "failure" if failed else "success",
            "duration": int(event.duration_s * 1e9),
        },
        "http": {
            "request": {"id": event.request_id, "method": event.method, "bytes": event.bytes_in},
            "response": {"status_code": event.status, "bytes": event.bytes_out},
        },
        "url": {"path": event.route},
    }
    if event.error_type is not None:
        document["error"] = {"type": event.error_type}
    if event.model is not None:
        usage = _compact(
            {"input_tokens": event.prompt_tokens, "output_tokens": event.completion_tokens}
        )
        document["gen_ai"] = _compact(
            {
                "request": {"model": event.model},
                "response": {"model": event.model_served} if event.model_served else None,
                "usage": usage or None,
            }
        )
    bastion = _compact(
        {
            "kind": event.kind,
            "client_request_id": event.client_request_id,
            "key_id": event.key_id,
            "role": event.role,
            "tier": event.tier,
            "upstream": event.upstream,
            "stream": event.stream,
            "ratelimit": event.ratelimit,
            "cut": event.cut,
            "cached_tokens": event.cached_tokens,
            "ttft_s": _seconds(event.ttft_s),
            "upstream_s": _seconds(event.upstream_s),
            "gateway_s": _seconds(event.gateway_s),
            "queue_wait_s": _seconds(event.queue_wait_s),
            "retries": event.retries or None,
            "watermark": event.watermark,
            "watermark_z": event.watermark_z,
            "repetition_rate": event.repetition_rate,
            "guards": [
                {"scanner": v.scanner, "stage": v.stage, "action": v.action}
                for v in event.guard_verdicts
            ]
            or None,
        }
    )
    if personal_data:
        if event.client_ip is not None:
            document["client"] = {"ip": event.client_ip}
        if event.user_agent is not None:
            document["user_agent"] = {"original": event.user_agent}
        if event.subject_id is not None:
            document["user"] = {"id": event.subject_id}
        if event.payload is not None:
            bastion["payload"] = event.payload
    document["bastion"] = bastion
    return document


def access_message(event: RequestEvent) -> str:
    """The line's readable message (what the console format shows)."""
    text = f"{event.method} {event.route} {event.status} {event.duration_s * 1000:.1f}ms"
    if event.model is not None:
        text += f" model={event.model}"
    if event.error_type is not None:
        text += f" error={event.error_type}"
    if event.cut is not None:
        text += f" cut={event.cut}"
    return text


class AccessLogSink:
    """``gateway.pipeline.EventSink`` named ``access_log``: one log line per request."""

    name = "access_log"

    def __init__(
        self,
        settings: LoggingSettings,
        *,
        interval_s: float = 0.05,
        capacity: int = 10_000,
        logger: logging.Logger | None = None,
    ) -> None:
        self.enabled = settings.access_log
        self._personal = settings.debug_personal_data
        self._interval = interval_s
        self._capacity = capacity
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._queue: deque[RequestEvent] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dropped = metrics.EVENT_SINK_DROPPED.labels(self.name)

    def offer(self, event: RequestEvent) -> None:
        """Queue the event for the writer thread; never blocks."""
        if not self.enabled:
            return
        if len(self._queue) >= self._capacity:
            self._dropped.inc()
            return
        self._queue.append(event)  # deque.append is atomic: no lock with the drainer
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="bastion-access-log", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        queue, logger = self._queue, self._logger
        if not logger.isEnabledFor(logging.INFO):
            queue.clear()
            return
        while True:
            try:
                event = queue.popleft()
            except IndexError:  # empty (flush() may drain from another thread)
                break
            record = logger.makeRecord(
                logger.name,
                logging.INFO,
                __file__,
                0,
                access_message(event),
                (),
                None,
                extra={
                    "ecs_document": access_document(event, self._personal),
                    "request_id": event.request_id,
                },
            )
            logger.handle(record)

    def flush(self) -> None:
        """Write what is queued now, from the calling thread (tests, shutdown)."""
        self._drain()

    def close(self) -> None:
        """Stop the writer thread after it wrote what was queued (the app's shutdown)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self._drain()
