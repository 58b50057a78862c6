"""Three ``bastion serve`` replicas behind nginx on loopback: the Kubernetes deployment's
shape on one machine (shared PostgreSQL and Redis, a balancer that retries elsewhere).

nginx stands in for the Service and the ingress controller: round robin over the
replicas, ``proxy_next_upstream error non_idempotent`` (the Ingress's "error" with
ingress-nginx's retry-non-idempotent: a call whose replica died before answering is sent
to another), no upstream keep-alive, no buffering (SSE passes through). ``drain(i)`` is
a pod's deletion: out of the balancer (nginx reloads; its old workers finish what they
carry), the preStop pause, SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.deploy.manifests import render
from tests.support import Gateway, ManagedProcess, ProcessPool, Upstream, free_port, upstream_entry

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "close";
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
            proxy_next_upstream error non_idempotent;
            proxy_next_upstream_tries 3;
            add_header x-replica $upstream_addr always;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.port = free_port()
        self.process: ManagedProcess | None = None
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self, ports: list[int], down: set[int]) -> Path:
        servers = "\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s{' down' * (p in down)};"
            for p in ports
        )
        conf = self.prefix / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(user=user, prefix=self.prefix, servers=servers, port=self.port)
        )
        return conf

    def _argv(self, conf: Path) -> list[str]:
        nginx = "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "nginx"
        return [
            nginx,
            "-p",
            str(self.prefix),
            "-c",
            str(conf),
            "-e",
            str(self.prefix / "error.log"),
        ]

    def start(self, ports: list[int]) -> None:
        conf = self._write(ports, set())
        self.process = ManagedProcess(self._argv(conf), self.prefix / "nginx.out")
        self.process.spawn()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {self.process.output()}")

    def reload(self, ports: list[int], down: set[int]) -> None:
        """New configuration; old workers finish the connections they hold."""
        conf = self._write(ports, down)
        subprocess.run([*self._argv(conf), "-s", "reload"], check=True, timeout=10)
        time.sleep(0.3)  # the new workers take over

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Cluster:
    """Three replicas of one configuration over one database and one Redis database."""

    def __init__(
        self,
        pool: ProcessPool,
        work_dir: Path,
        database_url: str,
        redis_url: str,
        upstreams: list[Upstream],
        **overrides: Any,
    ) -> None:
        self.pool = pool
        self.work_dir = work_dir
        self.database_url = database_url
        work_dir.mkdir(parents=True, exist_ok=True)
        self.master_key_file = work_dir / "master.key"
        if not self.master_key_file.exists():
            self.master_key_file.write_text(base64.b64encode(os.urandom(32)).decode())
        self.signing_key_file = work_dir / "signing.key"
        if not self.signing_key_file.exists():
            from compliance.signing import load_or_create_signing_key

            load_or_create_signing_key(self.signing_key_file)
        settings = {
            "dev": False,
            "database_url": database_url,
            "redis_url": redis_url,
            "master_key_file": str(self.master_key_file),
            "signing_key_file": str(self.signing_key_file),
            "auth": {"enabled": True, "key_refresh_s": 1.0},
            "audit": {"checkpoint_every_entries": 100, "checkpoint_every_s": 0.5},
        }
        self.upstreams = [upstream_entry(u) for u in upstreams]
        self.overrides = {**settings, **overrides}
        self.replicas: list[Gateway] = []
        self.app_key = ""
        self.admin_key = ""
        self.nginx = Nginx(work_dir / "nginx")
        self.config_file = work_dir / "bastion.yaml"
        from tests.support import gateway_config

        self.config_file.write_text(
            yaml.safe_dump(gateway_config(self.upstreams, **self.overrides), sort_keys=False)
        )

    # --- the migration Job, then the replicas ------------------------------------------
    def migrate(self) -> subprocess.CompletedProcess[str]:
        """The rendered migration Job's two containers, run here against the database."""
        job = next(r for r in render("production") if r["kind"] == "Job")
        pod = job["spec"]["template"]["spec"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env["BASTION_CONFIG"] = str(self.config_file)
        for container in [*pod["initContainers"], *pod["containers"]]:
            argv = list(container.get("command") or ["bastion"]) + list(container.get("args", []))
            argv = [a if a != "/etc/bastion/bastion.yaml" else str(self.config_file) for a in argv]
            argv[0] = _venv_tool(argv[0])
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=60, check=False
            )
            if done.returncode != 0:
                return done
        return done

    def start(self) -> None:
        errors: list[BaseException] = []
        entries: list[dict[str, Any] | Upstream] = list(self.upstreams)

        def one() -> None:
            try:
                gateway = self.pool.gateway(entries, wait_ready=True, **self.overrides)
                self.replicas.append(gateway)
            except BaseException as exc:  # re-raised in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        self.replicas.sort(key=lambda g: g.port)
        self.nginx.start(self.ports)

    @property
    def ports(self) -> list[int]:
        return [g.port for g in self.replicas]

    @property
    def url(self) -> str:
        return self.nginx.url

    def bastion(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        return subprocess.run(
            [_venv_tool("bastion"), *args, "--config", str(self.config_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def create_key(self, role: str) -> dict[str, Any]:
        import json

        done = self.bastion("keys", "create", "--role", role, "--json")
        assert done.returncode == 0, done.stderr
        created: dict[str, Any] = json.loads(done.stdout)
        return created

    # --- replica lifecycle -------------------------------------------------------------
    def kill(self, index: int) -> None:
        """SIGKILL to the replica's whole process group."""
        process = self.replicas[index].process
        assert process is not None
        process.kill()

    def drain(self, index: int, pre_stop_s: float) -> float:
        """Out of the balancer, the preStop pause, SIGTERM; the seconds until it exited."""
        self.nginx.reload(self.ports, down={self.ports[index]})
        time.sleep(pre_stop_s)
        process = self.replicas[index].process
        assert process is not None and process.proc is not None
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        process.proc.wait(40)
        return time.monotonic() - started

    def restart(self, index: int) -> None:
        """Start the replica again on its port and put it back in the balancer."""
        gateway = self.replicas[index]
        if gateway.process is not None:
            gateway.process.stop()
        gateway.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{gateway.url}/readyz", timeout=2).status_code != 200:
            assert time.monotonic() < deadline, gateway.output()
            time.sleep(0.1)
        self.nginx.reload(self.ports, down=set())

    def stop(self) -> None:
        self.nginx.stop()


def _venv_tool(name: str) -> str:
    import sys

    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
