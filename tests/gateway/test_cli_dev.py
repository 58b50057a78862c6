"""``bastion dev`` for a newcomer: a signal stops it at any moment of start-up, the banner
means the gateway answers, dev.yaml keeps the user's edits, one dev admin key at a time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ProcessPool, Upstream, bastion_command, free_port, wait_until

BANNER_END = "Ctrl-C stops it."


@pytest.fixture(scope="module")
def up(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("dev-up", ["dev-model"])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every ``bastion dev`` a test starts; any still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _start(
    work: Path, up: Upstream, port: int, started: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], Path]:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*bastion_command(), "dev", "--upstream", up.url, "--port", str(port)],
            cwd=work,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    started.append(proc)
    return proc, log


def _stop_within(proc: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# Printed once the CLI's imports are done (before this change: "created a master key").
PREPARED = re.compile(r"dev setup: created (?:a|the) master key")


def _wait_prepared(log: Path) -> None:
    wait_until(lambda: bool(PREPARED.search(log.read_text())), 60, 0.01, "preparation")


@pytest.mark.timeout(300)
def test_dev_banner_means_listening_and_a_signal_stops_it_at_any_moment(
    tmp_path: Path, up: Upstream, started: list[subprocess.Popen[bytes]]
) -> None:
    # A full start: when the banner appears, the gateway answers at once.
    port = free_port()
    proc, log = _start(tmp_path / "full", up, port, started)
    _wait_prepared(log)
    prepared = time.monotonic()
    wait_until(
        lambda: BANNER_END in log.read_text() or proc.poll() is not None,
        90,
        interval=0.02,
        what="the banner",
    )
    to_banner = time.monotonic() - prepared
    assert BANNER_END in log.read_text(), log.read_text()[-3000:]
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    proc.send_signal(signal.SIGINT)  # right after the banner (issue 14 item 16)
    assert _stop_within(proc, 15) == 0, log.read_text()[-3000:]
    assert not _listening(port)

    # The first signal at other moments, from the preparation to the gateway's own
    # start-up, SIGINT and SIGTERM alike: a clean stop within seconds, nothing left.
    moments = [(0.0, signal.SIGTERM), (0.3, signal.SIGINT), (0.55, signal.SIGTERM)]
    moments += [(0.8, signal.SIGINT), (0.95, signal.SIGTERM)]
    for i, (share, sig) in enumerate(moments):
        port = free_port()
        proc, log = _start(tmp_path / f"run{i}", up, port, started)
        _wait_prepared(log)
        time.sleep(to_banner * share)
        proc.send_signal(sig)
        code = _stop_within(proc, 15)
        output = log.read_text()
        where = f"{sig.name} at {share:.0%} of start-up: {output[-2000:]}"
        assert code == 0, where
        assert "stopped" in output and "Traceback" not in output, where
        assert not _listening(port), where

    # Even while the interpreter is still importing, it ends at once (as Python does).
    proc, log = _start(tmp_path / "imports", up, free_port(), started)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert _stop_within(proc, 15) is not None


def _prepare(tmp: Path, up: Upstream) -> tuple[str, Path]:
    from gateway.commands.dev import prepare_layout

    layout = prepare_layout(up.url, None, None, None, None, 8000, Path(".venv-inference"))
    return layout.admin_key, tmp / ".bastion" / "dev.yaml"


def test_dev_yaml_keeps_edits_names_the_dev_keys_and_one_admin_key_at_a_time(
    tmp_path: Path, up: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("BASTION_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    first_key, config = _prepare(tmp_path, up)
    document = yaml.safe_load(config.read_text())
    # The dev keys by absolute path (audit and compliance commands need them; item 18).
    for field, name in (("master_key_file", "master.key"), ("signing_key_file", "signing.key")):
        assert document[field] == str(tmp_path / ".bastion" / name), field
        assert (tmp_path / ".bastion" / name).stat().st_mode & 0o077 == 0
    assert document["database_url"] == f"sqlite:///{tmp_path / '.bastion' / 'dev.db'}"

    # The user's edits survive the next start; a key they removed comes back (item 24).
    document["rate_limits"] = {"requests_per_second": 7}
    document["server"]["port"] = 9999
    del document["signing_key_file"]
    config.write_text(yaml.safe_dump(document))
    second_key, _ = _prepare(tmp_path, up)
    again = yaml.safe_load(config.read_text())
    assert again["rate_limits"] == {"requests_per_second": 7}
    assert again["server"]["port"] == 9999
    assert again["signing_key_file"] == str(tmp_path / ".bastion" / "signing.key")

    # The same admin key at each start, not one more key that never expires (item 21).
    assert second_key == first_key
    from gateway.commands.common import open_keys

    store, _ = open_keys(config)
    admins = [k for k in store.all() if "admin" in k.roles]
    assert len(admins) == 1 and admins[0].expires_at is not None

    # Revoked: the next start mints a new one and no older dev admin key stays valid.
    store.revoke(admins[0].id)
    third_key, _ = _prepare(tmp_path, up)
    assert third_key != first_key
    assert [k.id for k in store.all() if "admin" in k.roles] == [third_key.split("_")[1]]
    store.engine.dispose()
