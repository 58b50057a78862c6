"""The verdicts: the project's targets checked against the measured figures."""

from __future__ import annotations

import statistics
from typing import Any

from bench.overhead.catalog import CHAIN_BASE, CHAIN_VARIANTS, VARIANT_WHAT
from bench.overhead.report import access_chain, derive, feature_costs, fmt, get

# Gateways checked against the project's targets.
VERDICT_TARGETS = ("bastion", "bastion-secure")
# Targets from docs (checked by the verdict); not used to produce any measured number.
TARGET_ADDED_P50_MS = 1.0
TARGET_RATIO_VS_LITELLM = 40.0
TARGET_CHAIN_ADDED_P50_MS = 0.3  # access chain vs bastion-bare, p50 at c=1
TARGET_CHAIN_RPS_COST = 0.20  # access chain vs bastion-bare: 1 - rps ratio at c=32
# Issue 16: metrics and event hand-off together at most 5 % of the default chain's
# throughput. Guards have latency targets of their own (bench/guards.py), none here.
FEATURE_TARGETS = {"telemetry": 0.05}


def verdict(results: dict[str, Any], conns: int, target: str = "bastion") -> dict[str, Any]:
    """The project's targets for one Bastion target, non-streaming, against direct/LiteLLM."""
    d = derive(results, "chat", conns).get(target, {})
    added = d.get("added_p50_c1_ms")
    ratio = d.get("rps_ratio_vs_litellm")
    runs = [get(results, target, "chat", k) for k in ("c1", f"c{conns}")]
    had_errors = any(r is not None and r["error_total"] for r in runs)
    return {
        "target": target,
        "added_p50_c1_ms": added,
        "added_p50_c1_target_ms": TARGET_ADDED_P50_MS,
        # A run with errors passes nothing: a fast error is not a fast proxy.
        "added_p50_c1_pass": None
        if added is None
        else added <= TARGET_ADDED_P50_MS and not had_errors,
        f"rps_c{conns}_vs_litellm": ratio,
        "rps_vs_litellm_target": TARGET_RATIO_VS_LITELLM,
        "rps_vs_litellm_pass": None
        if ratio is None
        else ratio >= TARGET_RATIO_VS_LITELLM and not had_errors,
        "bastion_had_errors": bool(had_errors),
    }


def chain_verdict(results: dict[str, Any], conns: int) -> dict[str, Any]:
    """The access chain's targets (non-streaming), for each variant against bastion-bare."""
    hi = f"c{conns}"
    out: dict[str, Any] = {}
    for variant, c in access_chain(results, "chat", conns).items():
        added, cost, bad = c["added_p50_c1_ms"], c[f"rps_cost_{hi}"], c["had_errors"]
        out[variant] = {
            **c,
            "added_p50_c1_target_ms": TARGET_CHAIN_ADDED_P50_MS,
            "added_p50_c1_pass": added <= TARGET_CHAIN_ADDED_P50_MS and not bad,
            "rps_cost_target": TARGET_CHAIN_RPS_COST,
            "rps_cost_pass": None if cost is None else cost <= TARGET_CHAIN_RPS_COST and not bad,
        }
    return out


def verdict_word(ok: bool | None, had_errors: bool) -> str:
    if ok is None:
        return "n/a (not measured)"
    if had_errors:
        return "FAIL (errors during the run)"
    return "PASS" if ok else "FAIL"


def print_verdict(v: dict[str, Any], conns: int) -> None:
    name, bad = v["target"], v["bastion_had_errors"]
    added = v["added_p50_c1_ms"]
    print(
        f"  {name}: added p50 at c=1 vs direct: {fmt(added)} ms"
        f" (target <= {TARGET_ADDED_P50_MS:g} ms): {verdict_word(v['added_p50_c1_pass'], bad)}"
    )
    ratio = v[f"rps_c{conns}_vs_litellm"]
    shown = "-" if ratio is None else f"{ratio:.1f}x"
    print(
        f"  {name}: rps@{conns} / LiteLLM rps@{conns}: {shown}"
        f" (target >= {TARGET_RATIO_VS_LITELLM:g}x): {verdict_word(v['rps_vs_litellm_pass'], bad)}"
    )
    if bad:
        print(f"  !!! {name} had errors during the measurement: the numbers above are suspect.")


def print_chain_verdict(chain: dict[str, Any], conns: int, shared_core: bool = False) -> None:
    hi = f"c{conns}"
    print(f"Access chain (non-streaming), against {CHAIN_BASE} ({VARIANT_WHAT[CHAIN_BASE]}):")
    if not chain:
        print(f"  n/a (not measured: needs {CHAIN_BASE} and {' or '.join(CHAIN_VARIANTS)})")
    for variant, c in chain.items():
        bad = c["had_errors"]
        cost = c[f"rps_cost_{hi}"]
        print(f"  {variant} ({c['what']}):")
        print(
            f"    added p50 at c=1: {fmt(c['added_p50_c1_ms'])} ms"
            f" (target <= {TARGET_CHAIN_ADDED_P50_MS:g} ms):"
            f" {verdict_word(c['added_p50_c1_pass'], bad)}"
        )
        how = ", side by side on one core" if shared_core else ""
        print(
            f"    throughput cost at c={conns}{how}:"
            f" {'-' if cost is None else f'{cost * 100:.1f}%'}"
            f" ({c[f'rps_{hi}']:.0f} vs {c[f'rps_{hi}_bare']:.0f} rps;"
            f" target <= {TARGET_CHAIN_RPS_COST * 100:g}%): {verdict_word(c['rps_cost_pass'], bad)}"
        )
        per_round = c[f"rps_cost_{hi}_per_round"]
        if len(per_round) > 1:
            shown = ", ".join(f"{x * 100:.1f}" for x in per_round)
            print(f"      per round: {shown} % (median {statistics.median(per_round) * 100:.1f} %)")
        cpu = c[f"cpu_cost_{hi}"]
        if cpu is not None:
            print(
                f"      CPU time per request at c={conns}: {cpu * 100:+.1f}%"
                f" ({c[f'cpu_us_per_request_{hi}']:.1f} vs"
                f" {c[f'cpu_us_per_request_{hi}_bare']:.1f} us)"
            )
        if bad:
            print(f"    !!! errors during the measurement of {variant} or {CHAIN_BASE}")


def feature_verdict(results: dict[str, Any], conns: int) -> dict[str, Any]:
    """Each feature's cost to the default chain (non-streaming), with its target if any."""
    hi = f"c{conns}"
    out: dict[str, Any] = {}
    for feature, c in feature_costs(results, "chat", conns).items():
        target = FEATURE_TARGETS.get(feature)
        cost, bad = c[f"rps_cost_{hi}"], c["had_errors"]
        out[feature] = {
            **c,
            "rps_cost_target": target,
            "rps_cost_pass": None if cost is None or target is None else cost <= target and not bad,
        }
    return out


def print_feature_verdict(features: dict[str, Any], conns: int, shared_core: bool) -> None:
    hi = f"c{conns}"
    how = ", side by side on one core" if shared_core else ""
    print("What each feature costs the default chain (non-streaming):")
    for feature, c in features.items():
        cost, cpu, bad = c[f"rps_cost_{hi}"], c[f"cpu_cost_{hi}"], c["had_errors"]
        target = c["rps_cost_target"]
        goal = (
            "no throughput target"
            if target is None
            else f"target <= {target * 100:g}%: {verdict_word(c['rps_cost_pass'], bad)}"
        )
        print(
            f"  {feature} ({c['what']}): throughput cost at c={conns}{how}:"
            f" {'-' if cost is None else f'{cost * 100:.1f}%'}"
            f" ({c[f'rps_{hi}']:.0f} vs {c[f'rps_{hi}_off']:.0f} rps; {goal})"
        )
        per_round = c[f"rps_cost_{hi}_per_round"]
        if len(per_round) > 1:
            shown = ", ".join(f"{x * 100:.1f}" for x in per_round)
            print(f"      per round: {shown} % (median {statistics.median(per_round) * 100:.1f} %)")
        if cpu is not None:
            print(
                f"      CPU time per request at c={conns}: {cpu * 100:+.1f}%"
                f" ({c[f'cpu_us_per_request_{hi}']:.1f} vs"
                f" {c[f'cpu_us_per_request_{hi}_off']:.1f} us)"
            )
        if bad:
            print(f"    !!! errors during the measurement of {feature}'s pair")
    if "telemetry" in features:
        print("  (telemetry: the access log only; metrics have no setting that turns them off)")
