"""docs/telemetry.md says what is exposed: its metric table matches monitors.metrics, and
its Prometheus scrape configurations pass promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from monitors import metrics as m
from tests.support import REPO_ROOT

DOC = REPO_ROOT / "docs" / "telemetry.md"
ROW = re.compile(r"^\| `(bastion_[a-z_]+)` \| ([a-z]+)(?: \(([a-z]+)\))? \| ([^|]*) \| ")


def exposed() -> dict[str, tuple[str, str | None, tuple[str, ...]]]:
    out = {}
    for obj in vars(m).values():
        if isinstance(obj, Counter | Gauge | Histogram):
            kind = obj._type
            name = obj._name + ("_total" if kind == "counter" else "")
            mode = obj._multiprocess_mode if kind == "gauge" else None
            out[name] = (kind, mode, tuple(obj._labelnames))
    return out


def documented() -> dict[str, tuple[str, str | None, tuple[str, ...]]]:
    out = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, kind, mode, labels = match.groups()
            names = tuple(x.strip() for x in labels.split(",")) if labels.strip() != "—" else ()
            out[name] = (kind, mode, names)
    return out


def test_the_metric_table_is_what_is_exposed() -> None:
    assert documented() == exposed()


def test_the_scrape_configurations_pass_promtool(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n# prometheus.yml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    for name in ("bastion.key", "bastion-ca.pem"):
        (tmp_path / name).write_text("x\n")
    for index, block in enumerate(blocks):
        path = tmp_path / f"prometheus-{index}.yml"
        path.write_text(block.replace("/etc/prometheus/", f"{tmp_path}/"))
        result = subprocess.run(
            ["promtool", "check", "config", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
