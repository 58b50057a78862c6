"""The README's commands, as a newcomer runs them: against the ``make dev`` layout (built
by a real ``bastion dev`` in front of the fixture upstream), from another folder; and
every ``bastion`` command the README names exists with the options it shows.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gateway.cli import app
from tests.support import (
    REPO_ROOT,
    ProcessPool,
    Upstream,
    bastion_command,
    chat_body,
    free_port,
    wait_until,
)

README = REPO_ROOT / "README.md"
DEV_BLOCK = re.compile(r"<!-- dev-commands:[^>]*-->\n```sh\n(.*?)```", re.S)
ADMIN_KEY = re.compile(r"admin key: (bst_\S+)")
KEY = re.compile(r"^(bst_\S+)$", re.M)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    # The README's PATH line names the project's .venv/bin; the tests' interpreter is here.
    bin_dir = Path(bastion_command()[0]).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def dev_commands() -> list[str]:
    """The README's dev block, one command a line (comments stripped)."""
    found = DEV_BLOCK.search(README.read_text(encoding="utf-8"))
    assert found, "README: no dev-commands block"
    lines = [line.split("  #", 1)[0].strip() for line in found.group(1).splitlines()]
    return [line for line in lines if line]


class DevGateway:
    """``bastion dev --upstream`` running in ``project``, its output in a file."""

    def __init__(self, project: Path, upstream: Upstream) -> None:
        self.project = project
        self.port = free_port()
        self.log = project.parent / f"dev-{self.port}.log"
        project.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*bastion_command(), "dev", "--upstream", upstream.url, "--port", str(self.port)],
                cwd=project,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_banner(self) -> str:
        wait_until(
            lambda: "Ctrl-C stops it." in self.output() or self.proc.poll() is not None,
            90,
            interval=0.1,
            what="bastion dev's banner",
        )
        found = ADMIN_KEY.search(self.output())
        assert found, self.output()[-3000:]
        return found.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def up(module_pool: ProcessPool) -> Upstream:
    return module_pool.upstream("readme-up", ["dev-model"])


@pytest.mark.timeout(240)
def test_readme_dev_commands_work_from_another_folder(tmp_path: Path, up: Upstream) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dev = DevGateway(project, up)
    try:
        admin_key = dev.wait_banner()
        gateway = httpx.Client(base_url=f"http://127.0.0.1:{dev.port}", timeout=30)
        r = gateway.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        assert r.status_code == 200, r.text

        commands = dev_commands()
        assert commands[0].startswith("export "), commands[0]
        script = "\n".join(
            [
                "set -ex",
                f"cd {shlex.quote(str(project))}",
                commands[0],
                f"cd {shlex.quote(str(elsewhere))}",
                *commands[1:],
            ]
        )
        done = subprocess.run(
            ["bash", "-c", script],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "audit log OK" in done.stdout, done.stdout
        # Nothing made in the other folder but what the commands were asked to write.
        assert sorted(p.name for p in elsewhere.iterdir()) == ["audit-public.pem", "export.tar"]

        # The key minted from the other folder works on the running gateway.
        (app_key,) = KEY.findall(done.stdout)

        def accepted() -> bool:
            headers = {"Authorization": f"Bearer {app_key}"}
            return gateway.get("/v1/models", headers=headers).status_code == 200

        wait_until(accepted, 10, interval=0.2, what="the new key to be accepted")
    finally:
        code = dev.stop()
    assert code == 0, dev.output()[-3000:]
    # The dev console shows a line per request (issue 14 item 21).
    assert "POST /v1/chat/completions 200" in dev.output(), dev.output()[-3000:]
    # Only bastion dev made secrets, all in the project's .bastion/, private.
    state = project / ".bastion"
    for name in ("master.key", "signing.key", "admin.key"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    assert not (project / "bastion.db").exists()


def test_commands_create_no_database_and_no_secret(tmp_path: Path) -> None:
    """Run where nothing is configured, they stop with one line and leave nothing."""
    signing = tmp_path / "keys" / "signing.key"
    assert CliRunner().invoke(app, ["secrets", "create-signing-key", str(signing)]).exit_code == 0
    work = tmp_path / "work"
    work.mkdir()
    env = _env()
    master = {"BASTION_MASTER_KEY": "QUFB" * 10 + "QUE="}
    runs = [
        (["audit", "verify"], {}),
        (["audit", "verify", "--signing-key-file", str(signing)], {}),
        (["audit", "retention", "--dry-run", "--signing-key-file", str(signing)], {}),
        (["keys", "list"], {}),
        (["keys", "list"], master),
        (["keys", "create", "--role", "app"], master),
        (["keys", "create", "--role", "app"], {}),
    ]
    for args, extra in runs:
        done = subprocess.run(
            [*bastion_command(), *args],
            cwd=work,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        where = f"bastion {' '.join(args)}: {done.stderr}"
        assert done.returncode == 2, where
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bastion"), where
        assert "Traceback" not in done.stderr and "OperationalError" not in done.stderr, where
        assert list(work.iterdir()) == [], where


def test_a_dev_configuration_without_secrets_is_refused_not_completed(tmp_path: Path) -> None:
    """Only bastion dev (and serve, starting a dev gateway) create secrets."""
    config = tmp_path / "conf" / "dev.yaml"
    config.parent.mkdir()
    config.write_text(
        "dev: true\ndatabase_url: sqlite:///dev.db\n"
        "upstreams: [{name: a, url: 'http://127.0.0.1:9', models: [m]}]\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [*bastion_command(), "keys", "create", "--role", "app", "--config", str(config)],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert "no master key" in done.stderr and "bastion dev" in done.stderr, done.stderr
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in config.parent.iterdir()) == ["dev.yaml"]


def _readme_bastion_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split("  #", 1)[0].strip()
            line = re.sub(r"^(\.venv/bin/|docker compose exec gateway )", "", line)
            if line.startswith("bastion "):
                lines.append(line)
    return lines


def test_every_bastion_command_in_the_readme_exists_with_its_options() -> None:
    lines = _readme_bastion_lines()
    assert len(lines) >= 10, lines
    runner = CliRunner()
    for line in lines:
        words = line.split()[1:]
        path = []
        for word in words:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            path.append(word)
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (line, shown.output)
        assert "Commands" not in shown.output or len(path) == 0, (line, "names a group only")
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
            assert option in shown.output, (line, option)
