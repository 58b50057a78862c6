"""Event shipping against a real server: osmem-server (an in-memory OpenSearch 3 API).

osmem has index templates, strict mappings, ``_bulk`` with per-item errors and
delete-by-query, but no ILM/ISM and no data streams: the shipper falls back to daily
indices there, which is what these tests exercise (docs/events.md lists what stays
unverified without a real Elasticsearch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme
import typer
from osmem_server import OsmemServer
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from monitors.events.cli import events_app, make_events_app
from monitors.events.cluster import Cluster, ClusterUnavailable
from monitors.events.settings import ClusterAuth, EventSettings
from monitors.events.shipper import EventShipper
from monitors.events.templates import MAPPINGS, TEMPLATE_VERSION, daily_index
from monitors.request_event import RequestEvent
from tests.monitors.test_events_ecs import ALL_ON, PROMPT, event_kinds

REPO = Path(__file__).resolve().parents[2]
T0 = 1_796_204_678_000_000  # 2026-12-02, microseconds


class Server:
    """An osmem-server that can be killed and restarted on the same port."""

    def __init__(self) -> None:
        self.proc = OsmemServer.start(japanese=False)
        self.url = self.proc.url
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def kill(self) -> None:
        self.proc.process.kill()
        self.proc.process.wait()

    def restart(self) -> None:
        self.proc = OsmemServer.start(japanese=False, addr=self.url.removeprefix("http://"))

    def get(self, path: str, **kw: Any) -> Any:
        return self.http.get(path, **kw).json()

    def docs(self, **query: Any) -> list[dict[str, Any]]:
        """Every event document, in the order the server indexed them."""
        self.http.post("/logs-bastion.gateway-*/_refresh")
        body = {"size": 10_000, "sort": ["_doc"], "query": query or {"match_all": {}}}
        hits = self.http.post("/logs-bastion.gateway-*/_search", json=body).json()
        return [{"_id": h["_id"], **h["_source"]} for h in hits["hits"]["hits"]]

    def close(self) -> None:
        self.http.close()
        self.proc.close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def settings_for(server: Server, tmp_path: Path, **changes: Any) -> EventSettings:
    base = dict(url=server.url, spool_dir=tmp_path / "spool", flush_interval_s=0.05, batch_size=50)
    return EventSettings(**{**base, **changes})


def numbered(n: int, start: int = 0, **changes: Any) -> list[RequestEvent]:
    return [
        RequestEvent(
            time_us=T0 + i * 1000,
            request_id=f"req-{i:06d}",
            route="/v1/chat/completions",
            model="tiny",
            status=200,
            duration_s=0.01,
            **changes,
        )
        for i in range(start, start + n)
    ]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_setup_installs_template_and_says_what_it_did(server: Server) -> None:
    settings = EventSettings(url=server.url, retention_days=7)
    async with Cluster(settings, ClusterAuth()) as cluster:
        first = await cluster.ensure_setup()
        second = await cluster.ensure_setup()
        forced = await cluster.ensure_setup(force=True)
    assert (first.flavour, first.template, first.lifecycle) == (
        "opensearch",
        "installed",
        "unavailable",
    )
    assert first.data_stream is False, "osmem has no data streams: daily indices"
    assert second.template == "present" and forced.template == "updated"
    installed = server.get("/_index_template/logs-bastion.gateway")["index_templates"][0]
    template = installed["index_template"]
    assert template["index_patterns"] == ["logs-bastion.gateway-*"]
    assert template["version"] == TEMPLATE_VERSION and template["priority"] > 100
    assert template["template"]["mappings"]["dynamic"] == "strict"
    assert any("NOT deleted after 7 days" in n for n in first.notes)


async def test_documents_match_the_mapping_and_strangers_are_refused(
    server: Server, tmp_path: Path
) -> None:
    shipper = EventShipper(
        settings_for(
            server,
            tmp_path,
            payloads=True,
            include_subject=True,
            include_client_ip=True,
            include_user_agent=True,
        )
    )
    await shipper.start()
    for event in event_kinds():
        shipper.offer(event)
    await until(lambda: shipper.stats.sent == 5)
    await shipper.stop()
    assert shipper.stats.failed == {} and shipper.stats.spooled == 0
    index = daily_index(ALL_ON, event_kinds()[0].time_us)
    mapping = server.get(f"/{index}/_mapping")[index]["mappings"]
    assert mapping["dynamic"] == "strict"
    assert set(mapping["properties"]) == set(MAPPINGS["properties"]), "nothing added on the fly"
    docs = {d["_id"]: d for d in server.docs()}
    assert set(docs) == {e.request_id for e in event_kinds()}
    assert docs["req-0001"]["bastion"]["payload"]["prompt"] == PROMPT
    assert docs["req-0001"]["event"]["duration"] == 1_250_000_000

    async with Cluster(ALL_ON.model_copy(update={"url": server.url}), ClusterAuth()) as cluster:
        stranger = orjson.dumps({"@timestamp": "2026-12-02T00:00:00Z", "surprise": 1})
        outcome = await cluster.bulk([(index, "stranger", stranger)])
    assert outcome.indexed == 0
    assert [kind for _, kind, _ in outcome.failed] == ["strict_dynamic_mapping_exception"]


async def test_no_prompt_in_documents_unless_payloads(server: Server, tmp_path: Path) -> None:
    shipper = EventShipper(settings_for(server, tmp_path))
    await shipper.start()
    for event in event_kinds():
        shipper.offer(event)
    await until(lambda: shipper.stats.sent == 5)
    await shipper.stop()
    stored = orjson.dumps(server.docs()).decode()
    for secret in (PROMPT, "canary", "203.0.113.9", "OpenAI/Python"):
        assert secret not in stored


async def test_per_item_errors_are_final_counted_and_logged_once(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(server, tmp_path)
    events = numbered(20, key_id="key-abc")
    # An index created before the template, with a field of another type: every
    # document gets a per-item mapper_parsing_exception.
    index = daily_index(settings, events[0].time_us)
    conflicting = {
        "mappings": {"properties": {"bastion": {"properties": {"key_id": {"type": "long"}}}}}
    }
    assert server.http.put(f"/{index}", json=conflicting).status_code == 200
    shipper = EventShipper(settings)
    failed_before = sample("bastion_events_failed_total", reason="mapper_parsing_exception")
    await shipper.start()
    with caplog.at_level(logging.WARNING, logger="bastion.events"):
        for event in events:
            shipper.offer(event)
        await until(lambda: shipper.stats.failed.get("mapper_parsing_exception") == 20)
        await shipper.stop()
    assert shipper.stats.sent == 0 and shipper.stats.spooled == 0 and shipper.stats.retried == 0
    failed = sample("bastion_events_failed_total", reason="mapper_parsing_exception")
    assert failed - failed_before == 20
    refusals = [r for r in caplog.records if "refused for good" in r.getMessage()]
    assert len(refusals) == 1 and "mapper_parsing_exception" in refusals[0].getMessage()
    assert "key-abc" not in caplog.text, "field values stay out of the log"


async def test_killed_server_gets_every_spooled_event_once_and_in_order(
    server: Server, tmp_path: Path
) -> None:
    shipper = EventShipper(settings_for(server, tmp_path))
    sent_before = sample("bastion_events_sent_total")
    await shipper.start()
    for event in numbered(30):
        shipper.offer(event)
    await until(lambda: shipper.stats.sent == 30)

    server.kill()
    for event in numbered(400, start=30):
        shipper.offer(event)
        if event.request_id.endswith("0"):
            await asyncio.sleep(0.005)  # spread over several batches
    await until(lambda: shipper.stats.spooled == 400)
    assert shipper.spool_gauges()[0] == 400
    await until(lambda: sample("bastion_events_spool_events") == 400)
    assert sample("bastion_events_spool_bytes") > 400 * 300
    assert sample("bastion_events_spool_oldest_age_seconds") > 0

    server.restart()  # empty: in-memory, no template either
    await until(lambda: shipper.stats.sent == 430, within=40)
    await shipper.stop()
    docs = server.docs()
    ids = [d["_id"] for d in docs]
    assert ids == [f"req-{i:06d}" for i in range(30, 430)], "each once, in spool order"
    assert [d["@timestamp"] for d in docs] == sorted(d["@timestamp"] for d in docs)
    assert server.get("/_index_template/logs-bastion.gateway")["index_templates"], "reinstalled"
    assert shipper.stats.duplicates == 0 and shipper.stats.dropped == 0
    assert shipper.spool_gauges() == (0, 0, 0.0)
    assert sample("bastion_events_sent_total") - sent_before == 430
    assert sample("bastion_events_spool_events") == 0


async def test_full_queue_overflows_into_the_spool(server: Server, tmp_path: Path) -> None:
    shipper = EventShipper(settings_for(server, tmp_path, queue_size=10))
    await shipper.start()
    for event in numbered(200):  # no await: the background task cannot drain meanwhile
        shipper.offer(event)
    assert shipper.stats.overflowed == 190 and shipper.stats.dropped == 0
    await until(lambda: shipper.stats.sent == 200)
    await shipper.stop()
    assert len({d["_id"] for d in server.docs()}) == 200


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from monitors.events.settings import EventSettings
    from monitors.events.shipper import EventShipper
    from monitors.events.spool import Spool
    from monitors.request_event import RequestEvent
    settings = EventSettings(url="http://127.0.0.1:9", spool_dir=Path(sys.argv[1]))
    render = EventShipper(settings)._render
    spool = Spool.create(settings.spool_dir, settings.spool_max_bytes)
    n = 0
    while True:
        batch = [RequestEvent(time_us=1796204678000000 + n + i, request_id=f"req-{n + i:06d}",
                              route="/v1/completions", status=200) for i in range(25)]
        spool.append([render(e).record() for e in batch])
        n += 25
        print(n, flush=True)
    """
)


async def test_spool_of_a_sigkilled_worker_is_adopted_and_replayed(
    server: Server, tmp_path: Path
) -> None:
    settings = settings_for(server, tmp_path, batch_size=500)
    child = subprocess.Popen(  # noqa: ASYNC220 (started once, read line by line)
        [sys.executable, "-c", CHILD, str(settings.spool_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = 0
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 2000:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    shipper = EventShipper(settings)
    await shipper.start()
    await until(lambda: shipper.stats.sent >= acknowledged, within=40)
    await until(
        lambda: (
            not [p for p in settings.spool_dir.iterdir() if p.name.split("-")[0] == str(child.pid)]
        )
    )
    await shipper.stop()
    ids = [d["_id"] for d in server.docs()]
    assert ids[:acknowledged] == [f"req-{i:06d}" for i in range(acknowledged)]
    assert len(ids) == len(set(ids)) == shipper.stats.sent


async def test_erasure_in_the_cluster_and_in_every_spool(server: Server, tmp_path: Path) -> None:
    settings = settings_for(server, tmp_path, include_subject=True)
    shipper = EventShipper(settings)
    await shipper.start()
    for i, event in enumerate(numbered(40)):
        event.subject_id = "alice" if i % 2 else "bob"
        shipper.offer(event)
    await until(lambda: shipper.stats.sent == 40)

    shipper.delivery.down_until = time.monotonic() + 3600  # cluster "down": the next ones spool
    for i, event in enumerate(numbered(10, start=40)):
        event.subject_id = "alice" if i % 2 else "bob"
        shipper.offer(event)
    await until(lambda: shipper.stats.spooled == 10)
    # another live worker's spool, with alice in it too
    other = EventShipper(settings)
    await other.start()
    other.delivery.down_until = time.monotonic() + 3600
    for event in numbered(4, start=50, subject_id="alice"):
        other.offer(event)
    await until(lambda: other.stats.spooled == 4)

    receipt = await shipper.erase_subject("alice")
    assert receipt["cluster"]["deleted"] == 20
    assert receipt["spool"] == {"deleted": 5 + 4, "spools": 2}
    assert server.docs(term={"user.id": "alice"}) == []
    for directory in (shipper._spool.directory, other._spool.directory):
        raw = b"".join(p.read_bytes() for p in directory.glob("*.seg"))
        assert b"alice" not in raw and raw.count(b"bob") == (
            5 if directory == shipper._spool.directory else 0
        )

    # the cluster is back: bob's spooled events arrive
    shipper.delivery.down_until = other.delivery.down_until = 0.0
    await until(lambda: shipper.stats.sent == 45)
    await shipper.stop()
    await other.stop()
    users = [d["user"]["id"] for d in server.docs()]
    assert users.count("bob") == 25 and "alice" not in users


def test_cli_setup(server: Server) -> None:
    runner = CliRunner()
    bastion = typer.Typer()
    bastion.add_typer(events_app, name="events")  # as the gateway's CLI mounts it
    result = runner.invoke(
        bastion, ["events", "setup", "--url", server.url, "--retention-days", "9"]
    )
    assert result.exit_code == 0, result.output
    assert "cluster: opensearch 3." in result.output
    assert "index template: installed" in result.output
    assert "lifecycle policy: unavailable" in result.output
    again = runner.invoke(bastion, ["events", "setup", "--url", server.url])
    assert "index template: present" in again.output
    server.kill()
    down = runner.invoke(bastion, ["events", "setup", "--url", server.url])
    assert down.exit_code == 1 and "ConnectError" in down.output


class WriterOnly(httpx.AsyncBaseTransport):
    """In front of the real server: 403 for everything but ``_bulk``, as a cluster answers
    a least-privilege writer's API key (no monitor, template or lifecycle privileges)."""

    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.forbidden = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/_bulk":
            self.forbidden += 1
            return httpx.Response(403, json={"error": {"type": "security_exception"}})
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_a_writer_without_setup_privileges_still_ships(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(server, tmp_path)
    async with Cluster(settings, ClusterAuth()) as admin:
        await admin.ensure_setup()  # what `bastion events setup` did with an admin key
    writer = WriterOnly()
    shipper = EventShipper(settings, transport=writer)
    await shipper.start()
    shipper.delivery.cluster.data_stream = False  # osmem: daily indices (the writer cannot ask)
    with caplog.at_level(logging.WARNING, logger="bastion.events"):
        for event in numbered(20):
            shipper.offer(event)
        await until(lambda: shipper.stats.sent == 20)
    await shipper.stop()
    assert writer.forbidden >= 1 and shipper.stats.spooled == 0
    assert "bastion events setup" in caplog.text


async def test_stop_during_an_outage_spools_and_the_next_process_replays(
    server: Server, tmp_path: Path
) -> None:
    settings = settings_for(server, tmp_path, flush_interval_s=5.0)
    first = EventShipper(settings)
    await first.start()
    server.kill()
    for event in numbered(20):
        first.offer(event)
    await first.stop()  # the queue was never flushed: stop() spools it
    assert first.stats.spooled == 20 and first.stats.sent == 0
    assert sum(1 for _ in settings.spool_dir.rglob("*.seg")) >= 1
    server.restart()
    second = EventShipper(settings)  # a restarted gateway worker
    await second.start()
    await until(lambda: second.stats.sent == 20)
    await second.stop()
    assert [d["_id"] for d in server.docs()] == [f"req-{i:06d}" for i in range(20)]
    assert not list(settings.spool_dir.iterdir()), "emptied spools are removed"


async def test_a_full_spool_drops_the_oldest_and_counts_them(
    server: Server, tmp_path: Path
) -> None:
    settings = settings_for(server, tmp_path, spool_max_bytes=64 * 1024)
    shipper = EventShipper(settings)
    dropped_before = sample("bastion_events_dropped_total")
    await shipper.start()
    server.kill()
    for event in numbered(600):  # ~600 bytes a record: about 100 fit
        shipper.offer(event)
        if event.request_id.endswith("0"):
            await asyncio.sleep(0.002)
    await until(lambda: shipper.stats.spooled == 600)
    dropped = shipper.stats.dropped
    assert 0 < dropped < 600
    assert sample("bastion_events_dropped_total") - dropped_before == dropped
    server.restart()
    await until(lambda: shipper.stats.sent == 600 - dropped, within=40)
    await shipper.stop()
    ids = [d["_id"] for d in server.docs()]
    assert ids == [f"req-{i:06d}" for i in range(dropped, 600)], "the newest, in order"


async def test_a_frozen_cluster_times_out_and_nothing_is_indexed_twice(
    server: Server, tmp_path: Path
) -> None:
    settings = settings_for(server, tmp_path, timeout_s=0.3)
    shipper = EventShipper(settings)
    await shipper.start()

    async def produce() -> None:
        for event in numbered(600):
            shipper.offer(event)
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(produce())
    await until(lambda: shipper.stats.sent > 50)
    server.proc.process.send_signal(signal.SIGSTOP)  # slow as can be: requests hang
    try:
        await until(lambda: shipper.stats.spooled > 100)
    finally:
        server.proc.process.send_signal(signal.SIGCONT)  # answers what it held, late
    await producer
    await until(lambda: shipper.stats.sent + shipper.stats.duplicates >= 600, within=40)
    await shipper.stop()
    ids = [d["_id"] for d in server.docs()]
    assert sorted(ids) == [f"req-{i:06d}" for i in range(600)], "each exactly once"
    # The held request was answered after its timeout: its documents came back from
    # the spool as refused duplicates, not as second copies.
    assert shipper.stats.sent + shipper.stats.duplicates == 600


async def test_erasure_without_subject_ids_still_cleans_earlier_documents(
    server: Server, tmp_path: Path
) -> None:
    before = EventShipper(settings_for(server, tmp_path, include_subject=True))
    await before.start()
    for event in numbered(6, subject_id="carol"):
        before.offer(event)
    await until(lambda: before.stats.sent == 6)
    await before.stop()
    # reconfigured: subject ids no longer shipped, so new documents cannot name carol
    now = EventShipper(settings_for(server, tmp_path, include_subject=False))
    await now.start()
    for event in numbered(4, start=6, subject_id="carol"):
        now.offer(event)
    await until(lambda: now.stats.sent == 4)
    receipt = await now.erase_subject("carol")
    await now.stop()
    assert receipt["cluster"]["deleted"] == 6 and receipt["spool"]["deleted"] == 0
    docs = server.docs()
    assert len(docs) == 4 and all("user" not in d for d in docs)


def test_cli_setup_reads_the_gateway_configuration(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "bastion.yaml"
    config.write_text("events: {}\n")
    seen: list[Path | None] = []

    def loader(path: Path | None) -> EventSettings:
        seen.append(path)
        return EventSettings(url="http://127.0.0.1:9", retention_days=3, namespace="prod")

    bastion = typer.Typer()
    bastion.add_typer(make_events_app(loader), name="events")
    result = CliRunner().invoke(
        bastion, ["events", "setup", "--config", str(config), "--url", server.url]
    )
    assert result.exit_code == 0, result.output
    assert seen == [config]
    assert "NOT deleted after 3 days" in result.output, "retention from the configuration"
    assert "logs-bastion.gateway-prod-YYYY.MM.DD" in result.output


async def test_tls_with_the_configured_ca(server: Server, tmp_path: Path) -> None:
    """The cluster behind TLS (a byte-for-byte TLS proxy in front of osmem): verified
    with ``ca_file``, refused without it."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    host, port = server.url.removeprefix("http://").split(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    url = f"https://localhost:{proxy.sockets[0].getsockname()[1]}"
    try:
        trusted = EventSettings(url=url, ca_file=tmp_path / "ca.pem")
        async with Cluster(trusted, ClusterAuth("Basic dTpw")) as cluster:
            report = await cluster.ensure_setup()
        assert report.template == "installed"
        async with Cluster(EventSettings(url=url), ClusterAuth()) as cluster:
            with pytest.raises(ClusterUnavailable, match="ConnectError"):
                await cluster.info()
    finally:
        proxy.close()
        await proxy.wait_closed()
