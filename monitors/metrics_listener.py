"""An optional listener that serves only the metrics, on an internal address, without a key.

``server.metrics_listen: "127.0.0.1:9464"`` (or an address on the cluster's internal
network) lets Prometheus scrape without an API key; ``/metrics`` on the gateway's port
keeps asking for a ``metrics:read`` key. Started by ``bastion serve`` in its own process
before uvicorn: with several workers that is the parent, which reads every worker's
files (``directory``); with one, the process that also serves requests, which reads its
own registry. prometheus_client's threaded WSGI server does the serving (gzip when asked,
any path but favicon.ico answers the metrics): nothing on it touches the request path.

Bind it to an address only Prometheus reaches: it has no TLS and no authentication.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from monitors.multiprocess import exposition_registry


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError names what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"metrics_listen: expected host:port, got {listen!r}")
    port = int(port_text)
    if not 0 <= port < 65536:
        raise ValueError(f"metrics_listen: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError when it is not one
    return host, port


@dataclass
class MetricsListener:
    """A running metrics listener; :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics_listener(listen: str, directory: Path | None = None) -> MetricsListener:
    """Serve the metrics on ``listen`` (``host:port``; port 0 picks one) in a thread.

    ``directory``: the workers' multiprocess directory when this process is their parent
    (from :func:`monitors.multiprocess.prepare_multiprocess_dir`); None exposes this
    process's own metrics (one worker).
    """
    host, port = parse_listen(listen)
    server, thread = start_http_server(port, addr=host, registry=exposition_registry(directory))
    return MetricsListener(server, thread)
