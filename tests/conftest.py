"""Shared fixtures: fixture upstreams and real gateway processes."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.support import ProcessPool


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessPool]:
    """Per-test processes: ``pool.upstream(name, models)``, ``pool.gateway([...], **settings)``."""
    procs = ProcessPool(tmp_path_factory.mktemp("procs"))
    yield procs
    if _failed(request):
        print(procs.report())
    procs.close()


@pytest.fixture(scope="module")
def module_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessPool]:
    """Processes shared by the tests of one module (their fixture state is reset per test)."""
    procs = ProcessPool(tmp_path_factory.mktemp("module-procs"))
    yield procs
    procs.close()


@pytest.fixture(autouse=True)
def _reset_module_upstreams(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests sharing module upstreams start from mode ``ok`` and zeroed counters."""
    if "module_pool" not in request.fixturenames:
        yield
        return
    module_pool: ProcessPool = request.getfixturevalue("module_pool")
    for up in module_pool.upstreams:
        if not up.alive():
            up.restart()
        up.reset()
    yield
    if _failed(request):
        print(module_pool.report())


@pytest.fixture
def gateway_factory(pool: ProcessPool) -> Any:
    """``gateway_factory(upstreams, **settings)`` -> a started Gateway, stopped after the test."""
    return pool.gateway
