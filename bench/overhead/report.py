"""The figures: rounds combined into medians, overheads against direct, the access chain
against the bare proxy, each feature on against off, and the tables that print them."""

from __future__ import annotations

import statistics
from typing import Any

from bench.overhead.catalog import (
    ALL_TARGETS,
    CHAIN_BASE,
    CHAIN_VARIANTS,
    FEATURE_BASE,
    FEATURE_OFF,
    GATEWAYS,
    SCENARIOS,
    VARIANT_WHAT,
)

TW = 14  # the least width of the target column


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the rounds of one (target, scenario, concurrency): medians, errors summed."""
    cpus = [r.get("cpu_us_per_request") for r in runs]
    per_round_cpu = cpus if all(c is not None for c in cpus) else None
    if len(runs) == 1:
        return {**runs[0], "per_round_rps": [runs[0]["rps"]], "per_round_cpu_us": per_round_cpu}
    lat_keys = runs[0]["latency_ms"].keys()
    errors = {k: sum(r["errors"][k] for r in runs) for k in runs[0]["errors"]}
    return {
        "connections": runs[0]["connections"],
        "rounds": len(runs),
        "duration_s": sum(r["duration_s"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "rps": statistics.median(r["rps"] for r in runs),
        "ok_rps": statistics.median(r["ok_rps"] for r in runs),
        "bytes": sum(r["bytes"] for r in runs),
        "errors": errors,
        "error_total": sum(errors.values()),
        "latency_ms": {k: statistics.median(r["latency_ms"][k] for r in runs) for k in lat_keys},
        "cpu_us_per_request": None if per_round_cpu is None else statistics.median(per_round_cpu),
        "per_round_rps": [r["rps"] for r in runs],
        "per_round_cpu_us": per_round_cpu,
        "per_round_loadavg_1m_before": [r.get("loadavg_1m_before") for r in runs],
    }


def combine_rounds(rounds: list[dict[str, Any]], conns: int) -> dict[str, Any]:
    """rounds: [{scenario: {cN: result} | {error}}] for one target."""
    combined: dict[str, Any] = {}
    for scenario in SCENARIOS:
        per = [r[scenario] for r in rounds if scenario in r]
        if not per:
            continue
        good = [p for p in per if "error" not in p]
        if len(good) < len(per):
            combined[scenario] = {"error": next(p["error"] for p in per if "error" in p)}
            continue
        combined[scenario] = {
            key: median_runs([p[key] for p in good]) for key in ("c1", f"c{conns}")
        }
    return combined


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio_str(ratio: float) -> str:
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def error_str(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in errors.items() if v) or "none"


def pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.3g}%"


def get(results: dict[str, Any], target: str, scenario: str, key: str) -> dict[str, Any] | None:
    entry = results.get(target, {})
    if "error" in entry or "skipped" in entry:
        return None
    sc = entry.get(scenario)
    if not sc or "error" in sc:
        return None
    value = sc.get(key)
    return value if isinstance(value, dict) else None


def derive(results: dict[str, Any], scenario: str, conns: int) -> dict[str, Any]:
    """Gateway overheads vs direct and throughput ratios, for one scenario."""
    hi = f"c{conns}"
    out: dict[str, Any] = {}
    d1 = get(results, "direct", scenario, "c1")
    dhi = get(results, "direct", scenario, hi)
    for gw in GATEWAYS:
        g1 = get(results, gw, scenario, "c1")
        ghi = get(results, gw, scenario, hi)
        if g1 is None or ghi is None:
            continue
        entry: dict[str, Any] = {}
        if d1 is not None:
            entry["added_p50_c1_ms"] = g1["latency_ms"]["p50"] - d1["latency_ms"]["p50"]
            entry["added_p99_c1_ms"] = g1["latency_ms"]["p99"] - d1["latency_ms"]["p99"]
        if dhi is not None:
            entry[f"added_p50_{hi}_ms"] = ghi["latency_ms"]["p50"] - dhi["latency_ms"]["p50"]
            entry["rps_ratio_vs_direct"] = ghi["rps"] / dhi["rps"] if dhi["rps"] else None
        for other in ("nginx", "litellm"):
            if other == gw:
                continue
            o = get(results, other, scenario, hi)
            if o is not None and o["rps"]:
                entry[f"rps_ratio_vs_{other}"] = ghi["rps"] / o["rps"]
        if entry:
            out[gw] = entry
    return out


def paired_costs(variant_rps: list[float] | None, bare_rps: list[float] | None) -> list[float]:
    """1 - variant / bare, round by round; empty unless both have the same rounds."""
    if not variant_rps or not bare_rps or len(variant_rps) != len(bare_rps):
        return []
    return [1 - v / b for v, b in zip(variant_rps, bare_rps, strict=True) if b]


def pair_cost(
    results: dict[str, Any],
    scenario: str,
    conns: int,
    variant: str,
    base: str,
    what: str,
    base_tag: str = "bare",
) -> dict[str, Any] | None:
    """What ``variant`` costs over ``base`` (None unless both were measured); the base's
    own figures under keys ending in ``_{base_tag}``."""
    hi = f"c{conns}"
    b1, bhi = get(results, base, scenario, "c1"), get(results, base, scenario, hi)
    v1, vhi = get(results, variant, scenario, "c1"), get(results, variant, scenario, hi)
    if b1 is None or bhi is None or v1 is None or vhi is None:
        return None
    notes = results[variant].get("setup", {}).get("notes", [])
    extra = any(n.startswith("--bastion-extra") for n in notes)
    vcpu, bcpu = vhi.get("cpu_us_per_request"), bhi.get("cpu_us_per_request")
    return {
        "against": base,
        "what": what + (" (changed by --bastion-extra)" if extra else ""),
        "added_p50_c1_ms": v1["latency_ms"]["p50"] - b1["latency_ms"]["p50"],
        "added_p99_c1_ms": v1["latency_ms"]["p99"] - b1["latency_ms"]["p99"],
        f"added_p50_{hi}_ms": vhi["latency_ms"]["p50"] - bhi["latency_ms"]["p50"],
        f"rps_{hi}": vhi["rps"],
        f"rps_{hi}_{base_tag}": bhi["rps"],
        # The share of the base's throughput that the difference costs.
        f"rps_cost_{hi}": 1 - vhi["rps"] / bhi["rps"] if bhi["rps"] else None,
        # Round i of the variant against round i of the base: with --interleave the two
        # ran seconds apart, on the same servers.
        f"rps_cost_{hi}_per_round": paired_costs(
            vhi.get("per_round_rps"), bhi.get("per_round_rps")
        ),
        # The extra CPU time per request, the cost the machine's speed moves least.
        f"cpu_cost_{hi}": vcpu / bcpu - 1 if vcpu is not None and bcpu else None,
        f"cpu_us_per_request_{hi}": vcpu,
        f"cpu_us_per_request_{hi}_{base_tag}": bcpu,
        "had_errors": any(r["error_total"] for r in (b1, bhi, v1, vhi)),
    }


def access_chain(results: dict[str, Any], scenario: str, conns: int) -> dict[str, Any]:
    """What the access chain costs: each CHAIN_VARIANTS target against bastion-bare."""
    out: dict[str, Any] = {}
    for variant in CHAIN_VARIANTS:
        cost = pair_cost(results, scenario, conns, variant, CHAIN_BASE, VARIANT_WHAT[variant])
        if cost is not None:
            out[variant] = cost
    return out


def feature_costs(results: dict[str, Any], scenario: str, conns: int) -> dict[str, Any]:
    """What each feature costs the default chain: bastion-secure (every feature on) against
    the same with that feature off (catalog.FEATURE_OFF), by feature."""
    out: dict[str, Any] = {}
    for off, (feature, _) in FEATURE_OFF.items():
        what = f"{FEATURE_BASE} against {off}"
        cost = pair_cost(results, scenario, conns, FEATURE_BASE, off, what, "off")
        if cost is not None:
            out[feature] = cost
    return out


def print_tables(results: dict[str, Any], scenario: str, conns: int, title: str) -> None:
    """One scenario's tables: the targets, the gateways against direct, the access chain
    against the bare proxy and each feature on against off (those that were measured)."""
    width = max(TW, *(len(t) for t in results)) if results else TW
    print()
    print(title)
    print_targets(results, scenario, conns, width)
    print_derived(derive(results, scenario, conns), conns, width)
    print_costs(
        "access chain",
        access_chain(results, scenario, conns),
        conns,
        width,
        f"(against {CHAIN_BASE}, {VARIANT_WHAT[CHAIN_BASE]}; cost: 1 - rps@{conns}"
        f" / rps@{conns} of {CHAIN_BASE}; CPU/req: the gateway's CPU time per request"
        f" at c={conns} over {CHAIN_BASE}'s)",
    )
    print_costs(
        "feature",
        feature_costs(results, scenario, conns),
        conns,
        width,
        f"({FEATURE_BASE}, every feature on, against the same with one off; cost: 1 -"
        f" rps@{conns} / rps@{conns} with it off; CPU/req: CPU time per request over"
        " the one with it off; telemetry = the access log: metrics cannot be turned off)",
    )


def print_targets(results: dict[str, Any], scenario: str, conns: int, width: int) -> None:
    hi = f"c{conns}"
    header = (
        f"{'target':<{width}} {'rps@' + str(conns):>10} {'p50@1':>9} {'p99@1':>9}"
        f" {'p50@' + str(conns):>9} {'p99@' + str(conns):>9}  errors"
    )
    print(header)
    print("-" * len(header) + "--------")
    for target in ALL_TARGETS:
        if target not in results:
            continue
        entry = results[target]
        if "skipped" in entry or "error" in entry:
            if "skipped" in entry:
                why = f"skipped: {entry['skipped']}"
            else:
                why = f"!!! FAILED: {entry['error'].splitlines()[0] if entry['error'] else ''}"
            print(f"{target:<{width}} ({why})"[:160])
            continue
        sc = entry.get(scenario)
        if sc is None:
            continue
        if "error" in sc:
            print(f"{target:<{width}} !!! FAILED: {sc['error']}"[:160])
            continue
        r1, rh = sc["c1"], sc[hi]
        n_err = r1["error_total"] + rh["error_total"]
        err = (
            "0"
            if n_err == 0
            else f"{n_err}  !!! ERRORS: c=1 {error_str(r1['errors'])};"
            f" c={conns} {error_str(rh['errors'])}"
        )
        print(
            f"{target:<{width}} {rh['rps']:>10.1f} {r1['latency_ms']['p50']:>9.3f}"
            f" {r1['latency_ms']['p99']:>9.3f} {rh['latency_ms']['p50']:>9.3f}"
            f" {rh['latency_ms']['p99']:>9.3f}  {err}"
        )
    print("(rps: requests/s, wrk -t1; latencies in ms; @1 = 1 connection)")


def print_derived(derived: dict[str, Any], conns: int, width: int) -> None:
    if not derived:
        return
    hi = f"c{conns}"
    print()
    header = (
        f"{'gateway':<{width}} {'+p50@1 ms':>10} {'+p99@1 ms':>10}"
        f" {'+p50@' + str(conns) + ' ms':>11} {'rps/direct':>11}"
        f"  throughput ratios (rps@{conns})"
    )
    print(header)
    print("-" * 110)
    for gw, d in derived.items():
        ratios = []
        for other in ("nginx", "litellm"):
            key = f"rps_ratio_vs_{other}"
            if d.get(key) is not None:
                ratios.append(f"{gw}/{other} = {ratio_str(d[key])}")
        print(
            f"{gw:<{width}} {fmt(d.get('added_p50_c1_ms')):>10}"
            f" {fmt(d.get('added_p99_c1_ms')):>10} {fmt(d.get(f'added_p50_{hi}_ms')):>11}"
            f" {pct(d.get('rps_ratio_vs_direct')):>11}  {'  '.join(ratios)}"
        )
    print("(+: added over direct, ms; rps/direct: rps@" + str(conns) + " as % of direct)")


def print_costs(title: str, costs: dict[str, Any], conns: int, width: int, legend: str) -> None:
    """A table of pair_cost figures (the access chain's, the features')."""
    if not costs:
        return
    hi = f"c{conns}"
    print()
    header = (
        f"{title:<{width}} {'+p50@1 ms':>10} {'+p99@1 ms':>10}"
        f" {'+p50@' + str(conns) + ' ms':>11} {'rps@' + str(conns) + ' cost':>12}"
        f" {'CPU/req':>8}  what"
    )
    print(header)
    print("-" * 110)
    for name, c in costs.items():
        cost = c[f"rps_cost_{hi}"]
        cpu = c[f"cpu_cost_{hi}"]
        print(
            f"{name:<{width}} {fmt(c['added_p50_c1_ms']):>10} {fmt(c['added_p99_c1_ms']):>10}"
            f" {fmt(c[f'added_p50_{hi}_ms']):>11}"
            f" {'-' if cost is None else f'{cost * 100:.1f}%':>12}"
            f" {'-' if cpu is None else f'{cpu * 100:+.1f}%':>8}  {c['what']}"
            f"{'  !!! ERRORS' if c['had_errors'] else ''}"
        )
    print(legend)
