"""Structured logs: ECS JSON lines (or a console format), the request id on every line.

- :class:`LoggingSettings` is the ``logging:`` configuration section.
- :data:`request_id_var` holds the id of the request being served; the request-id
  middleware sets it, :class:`RequestIdFilter` copies it onto every record, so every line
  logged while a request is served names it (``http.request.id`` in ECS).
- :class:`ECSFormatter` writes one JSON object per line in Elastic Common Schema form
  (ecs-logging's ``StdlibFormatter``), :class:`ConsoleFormatter` a readable line.
- :func:`logging_config` is a ``logging.config.dictConfig`` document for the whole process,
  uvicorn's loggers included: give it to ``uvicorn.run(log_config=...)`` and uvicorn
  applies it in the parent and in every worker it spawns.
- :class:`AccessLogSink` (monitors/access_log.py) writes one access line per request.

Privacy: the access line leaves out the client address, user agent, subject id and
payload unless ``debug_personal_data`` is on; no line ever carries an API key.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Literal

import ecs_logging
import orjson
from pydantic import BaseModel, ConfigDict

SERVICE_NAME = "bastion"
ECS_VERSION = "9.0.0"
"""The ECS version the lines follow (the gen_ai fields are ECS 9's; ecs-logging says 1.6);
the events shipped to Elasticsearch declare the same (monitors/events/ecs.py)."""
ACCESS_LOGGER = "bastion.access"

request_id_var: ContextVar[str | None] = ContextVar("bastion_request_id", default=None)
"""The gateway request id of the request being served in this context (None outside)."""


class LoggingSettings(BaseModel):
    """The ``logging:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["auto", "json", "console"] = "auto"
    """json: ECS JSON lines; console: one readable line; auto: json for ``bastion serve``,
    console for ``bastion dev``."""
    access_log: bool = True
    """One line per request on the ``bastion.access`` logger (info level)."""
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    debug_personal_data: bool = False
    """Put the client address, user agent, subject id and (when events carry them)
    prompts and answers in the access line. For debugging only: logs are personal data
    then, and retention and erasure do not reach them."""

    def resolved_format(self, dev: bool) -> Literal["json", "console"]:
        if self.format == "auto":
            return "console" if dev else "json"
        return self.format


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (from :data:`request_id_var`) to every record it sees.

    Put it on handlers, not loggers: a logger's filters see only the records logged on
    that logger itself, a handler's see every record that reaches it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


# Fields ecs-logging would add that only repeat something or leak a terminal's colours.
_EXCLUDED = (
    "log.original",  # the message again
    "color_message",  # uvicorn's ANSI-coloured copy of its message
    "process.thread",
    "log.origin",
    "ecs_document",
    "request_id",
)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler, on stderr; it takes Python's warnings too (``py.warnings``), so
    that a library's DeprecationWarning comes out as a line of the same format."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        logging.captureWarnings(True)


class ECSFormatter(ecs_logging.StdlibFormatter):
    """One ECS JSON object per record: ``@timestamp``, ``log.level``, ``message``,
    ``log.logger``, ``process.pid``, ``service.name``, ``http.request.id``, ``error.*``.

    A record that carries a ready ``ecs_document`` (the access line) is written as that
    document plus the record's level and logger: building it field by field through the
    generic path would cost several times more on every request.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("exclude_fields", _EXCLUDED)
        super().__init__(**kwargs)

    def format(self, record: logging.LogRecord) -> str:
        document = getattr(record, "ecs_document", None)
        if document is not None:
            head = {
                "@timestamp": document.pop("@timestamp", None) or self._record_timestamp(record),
                "log.level": record.levelname.lower(),
                "message": record.getMessage(),
                "ecs.version": ECS_VERSION,
                "log": {"logger": record.name},
                "service": {"name": SERVICE_NAME},
            }
            head.update(document)
            return orjson.dumps(head).decode()
        return str(super().format(record))

    def format_to_ecs(self, record: logging.LogRecord) -> dict[str, Any]:
        result: dict[str, Any] = super().format_to_ecs(record)
        result["ecs.version"] = ECS_VERSION
        result.setdefault("service", {})["name"] = SERVICE_NAME
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            http = result.setdefault("http", {})
            http.setdefault("request", {})["id"] = request_id
        return result


class ConsoleFormatter(logging.Formatter):
    """``2026-12-02 09:51:27,123 INFO gateway.app [req-id]: message`` (no id: ``[-]``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def logging_config(
    settings: LoggingSettings,
    *,
    dev: bool = False,
    uvicorn_access: bool = False,
) -> dict[str, Any]:
    """A ``dictConfig`` document: every logger (root, uvicorn's, ``bastion.access``) writes
    to stderr through one handler, in the configured format, with the request id.

    ``uvicorn_access``: keep uvicorn's own access lines too (off by default: they carry
    the raw path and query, and :class:`AccessLogSink` writes a better line).
    """
    formatter = {
        "json": {"()": "monitors.logs.ECSFormatter"},
        "console": {"()": "monitors.logs.ConsoleFormatter"},
    }[settings.resolved_format(dev)]
    level = settings.level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "monitors.logs.RequestIdFilter"}},
        # uvicorn sets use_colors on "default" and "access" when asked: both must exist.
        "formatters": {"default": formatter, "access": formatter},
        "handlers": {
            "stderr": {
                "()": "monitors.logs.StderrHandler",
                "formatter": "default",
                "filters": ["request_id"],
            },
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's loggers propagate to root; their own default handlers would
            # write every line a second time, in uvicorn's format.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {
                "handlers": [],
                "level": "INFO" if uvicorn_access else "CRITICAL",
                "propagate": uvicorn_access,
            },
            # The access line is info: it is written whatever the general level says.
            ACCESS_LOGGER: {
                "handlers": [],
                "level": "INFO" if settings.access_log else "CRITICAL",
                "propagate": True,
            },
        },
    }


def configure_logging(settings: LoggingSettings, *, dev: bool = False) -> None:
    """Apply :func:`logging_config` to this process (the CLI, before uvicorn starts)."""
    import logging.config

    logging.config.dictConfig(logging_config(settings, dev=dev))


def uvicorn_log_options(
    settings: LoggingSettings, *, dev: bool = False, uvicorn_access: bool = False
) -> dict[str, Any]:
    """``uvicorn.run``'s logging options: :func:`logging_config` as its ``log_config``
    (applied in the parent and in every worker it spawns) and uvicorn's own level and
    access switches left alone, since the document sets both."""
    return {
        "log_config": logging_config(settings, dev=dev, uvicorn_access=uvicorn_access),
        "log_level": None,
        "access_log": uvicorn_access,
    }
