"""chain_instructions.py's variants with features switched off, and their arithmetic.

The count itself needs valgrind and minutes (bench/README.md); here: the names resolve to
real settings that turn off what they say, and the costs are read the right way round.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chain.variants import settings_for, split_variant
from bench.chain_instructions import feature_costs


def test_switches_compose_and_unknown_names_are_refused() -> None:
    assert split_variant("bastion") == ("bastion", {})
    base, changes = split_variant("bastion-redis-guards-off-no-telemetry")
    assert base == "bastion-redis"
    assert changes == {"guards": {"enabled": False}, "logging": {"access_log": False}}
    with pytest.raises(ValueError, match="unknown variant"):
        split_variant("bastion-fast")


def test_switched_off_settings_are_the_gateways(tmp_path: Path) -> None:
    on = settings_for("bastion", tmp_path, "redis://127.0.0.1:6379/0")
    assert on.guards.enabled and on.logging.access_log and on.rate_limits.enabled
    off = settings_for("bastion-guards-off-no-telemetry", tmp_path, "redis://127.0.0.1:6379/0")
    assert not off.guards.enabled and not off.logging.access_log
    assert off.rate_limits.enabled and off.auth.enabled  # the rest of the variant stays
    bare = settings_for(
        "bare-guards-off", tmp_path, "redis://x", extra={"audit": {"enabled": True}}
    )
    assert not bare.auth.enabled and not bare.guards.enabled and bare.audit.enabled


def test_feature_costs_are_the_variant_with_it_on_minus_without() -> None:
    costs = feature_costs(
        {"bare": 300.0, "bastion": 400.0, "bastion-guards-off": 350.0, "bare-no-telemetry": 1.0}
    )
    assert costs["bastion - bastion-guards-off"] == ("bastion", 50.0, pytest.approx(0.125))
    assert costs["bare - bare-no-telemetry"][0] == "bare"
    assert len(costs) == 2
    # Two switches: paired with each variant that has one of them on.
    counted = {"bare-guards-off": 500.0, "bare-no-telemetry": 900.0}
    two = feature_costs({**counted, "bare-guards-off-no-telemetry": 490.0})
    assert two["bare-guards-off - bare-guards-off-no-telemetry"][1] == 10.0
    assert two["bare-no-telemetry - bare-guards-off-no-telemetry"][1] == 410.0
    # A variant with the feature off whose counterpart was not counted: nothing to say.
    assert feature_costs({"bastion-redis-guards-off": 1.0}) == {}
