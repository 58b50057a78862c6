"""A key works on its first use in every worker (issue 14, item 15).

``bastion serve`` with two workers and a key cache that would not refresh for an hour:
keys made by ``bastion keys create`` and by ``POST /admin/keys`` (in one worker) are
accepted at once on fresh connections, whichever worker takes them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx

from tests.gateway.test_access import MASTER_KEY, secure_settings
from tests.support import ProcessPool, bastion_command


def test_keys_work_on_first_use_with_two_workers(pool: ProcessPool, tmp_path: Path) -> None:
    upstream = pool.upstream("first-use-up", ["m1"])
    settings = secure_settings(tmp_path / "bastion.db")
    settings["auth"] = {"enabled": True, "key_refresh_s": 3600}
    settings["rate_limits"] = {"enabled": False}
    settings["server"] = {"workers": 2}
    gateway = pool.gateway([upstream], env={"BASTION_MASTER_KEY": MASTER_KEY}, **settings)

    def create(role: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env["BASTION_MASTER_KEY"] = MASTER_KEY
        argv = [*bastion_command(), "keys", "create", "--role", role, "--json"]
        done = subprocess.run(
            [*argv, "--config", str(gateway.config_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        key: str = json.loads(done.stdout)["key"]
        return key

    def statuses(key: str, path: str = "/v1/models") -> list[int]:
        # A new connection each time: the two workers share the listening socket.
        headers = {"authorization": f"Bearer {key}", "connection": "close"}
        return [httpx.get(gateway.url + path, headers=headers).status_code for _ in range(8)]

    admin = create("admin")  # no waiting for a refresh
    assert statuses(admin) == [200] * 8
    assert statuses(create("app")) == [200] * 8
    made = httpx.post(
        gateway.url + "/admin/keys",
        json={"roles": ["app"]},
        headers={"authorization": f"Bearer {admin}"},
    )
    assert made.status_code == 201, made.text
    assert statuses(made.json()["key"]) == [200] * 8
    # A made-up key is still refused.
    fake = "bst_0123456789abcdef_" + "A" * 43
    assert statuses(fake) == [401] * 8
