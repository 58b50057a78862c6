"""The few panel shapes Bastion's dashboards use, built with grafana-foundation-sdk.

Every panel here takes its unit as a required argument (a panel without one shows bare
numbers that an SRE has to guess at), its queries as ``Query`` values, and the
datasource from the ``$datasource`` variable, so the same JSON works on the stack's
provisioned Prometheus and on any other Grafana it is pushed to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
"""Every panel and variable queries the Prometheus chosen in ``$datasource``."""

RATE = "$__rate_interval"
"""The range of every rate(): Grafana's interval, never shorter than four scrapes."""


@dataclass(frozen=True)
class Query:
    """One PromQL expression and how its series are named in the legend."""

    expr: str
    legend: str = ""
    instant: bool = False


def _targets(queries: Sequence[Query]) -> list[prometheus.Dataquery]:
    targets = []
    for index, query in enumerate(queries):
        target = (
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .expr(query.expr)
            .datasource(DATASOURCE)
        )
        if query.legend:
            target = target.legend_format(query.legend)
        target = target.instant() if query.instant else target.range()
        targets.append(target)
    return targets


def graph(
    title: str,
    unit: str,
    description: str,
    queries: Sequence[Query],
    *,
    width: int = 12,
    height: int = 8,
    min_val: float | None = None,
    max_val: float | None = None,
    stacked: bool = False,
) -> timeseries.Panel:
    """A time series panel."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .fill_opacity(10)
        .line_width(1)
    )
    if stacked:
        panel = panel.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
        ).fill_opacity(40)
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    for target in _targets(queries):
        panel = panel.with_target(target)
    return panel


def single_stat(
    title: str,
    unit: str,
    description: str,
    queries: Sequence[Query],
    *,
    width: int = 6,
    height: int = 5,
    decimals: int | None = None,
    thresholds: Sequence[tuple[float | None, str]] = (),
) -> stat.Panel:
    """A big number (the last value), coloured by ``thresholds`` [(from, colour), ...]."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    if thresholds:
        panel = panel.thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=value, color=colour) for value, colour in thresholds])
        )
    for target in _targets(queries):
        panel = panel.with_target(target)
    return panel


def datasource_variable() -> dashboard_builders.DatasourceVariable:
    return (
        dashboard_builders.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value="bastion-prometheus"))
    )


def label_variable(
    name: str, label: str, metric: str, title: str
) -> dashboard_builders.QueryVariable:
    """A multi-select ``$name`` over the values of ``label`` on ``metric`` (default: all)."""
    return (
        dashboard_builders.QueryVariable(name)
        .label(title)
        .datasource(DATASOURCE)
        .query({"query": f"label_values({metric}, {label})", "refId": f"{name}-values"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


@dataclass(frozen=True)
class Section:
    """A row of the dashboard and the panels under it."""

    title: str
    panels: Sequence[timeseries.Panel | stat.Panel]


def dashboard(
    uid: str,
    title: str,
    description: str,
    sections: Sequence[Section],
    variables: Sequence[dashboard_builders.QueryVariable],
) -> dashboard_builders.Dashboard:
    """A dashboard with a fixed uid, Bastion's tags, the last 6 hours, refreshed every 30 s."""
    board = (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["bastion"])
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .editable()
        .annotation(
            # Grafana's own (alerts and notes made in the UI), and every page that fired,
            # so a graph's bend lines up with the alert it raised.
            dashboard_builders.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .built_in(1)
        )
        .annotation(
            dashboard_builders.AnnotationQuery()
            .name("Pages")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr('ALERTS{alertstate="firing",severity="page"}')
        )
        .with_variable(datasource_variable())
    )
    for variable in variables:
        board = board.with_variable(variable)
    # Fixed panel ids, in reading order: links to a panel (viewPanel=N) survive a rebuild.
    panel_id = 0
    for section in sections:
        panel_id += 1
        board = board.with_row(dashboard_builders.Row(section.title).id(panel_id))
        for panel in section.panels:
            panel_id += 1
            board = board.with_panel(panel.id(panel_id))
    return board


def quantile(q: float, metric: str, by: str, selector: str) -> str:
    """The q-quantile of a histogram over the panel's rate interval, from its buckets
    (never ``_sum/_count``, which averages since the process started)."""
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


def rate_sum(metric: str, by: str, selector: str) -> str:
    """Per-second rate of a counter, summed by ``by`` (empty: one total)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{RATE}]))"
