"""The gateway's lifespan: what start-up built is frozen out of the garbage collector."""

from __future__ import annotations

import base64
import gc

from starlette.testclient import TestClient

from gateway.app import BastionApp
from gateway.config import Settings

MASTER_KEY = bytes(range(32))


def test_what_start_up_built_is_frozen_out_of_the_collector_while_serving(
    database_url: str,
) -> None:
    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        dev=True,
        master_key=base64.b64encode(MASTER_KEY).decode(),
        database_url=database_url,
        auth={"enabled": False},
        health_check={"enabled": False},
        audit={"enabled": False},
    )
    app = BastionApp(settings)
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == (10_000, *before[1:])
        assert client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_the_young_generation_threshold_is_a_setting(database_url: str) -> None:
    settings = Settings(
        upstreams=[{"name": "a", "url": "http://127.0.0.1:9", "models": ["m1"]}],
        dev=True,
        master_key=base64.b64encode(MASTER_KEY).decode(),
        database_url=database_url,
        server={"gc_young_threshold": 2500},
        auth={"enabled": False},
        health_check={"enabled": False},
        audit={"enabled": False},
    )
    before = gc.get_threshold()
    with TestClient(BastionApp(settings)):
        assert gc.get_threshold()[0] == 2500
    assert gc.get_threshold() == before
