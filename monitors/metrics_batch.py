"""Observations gathered in memory and written to prometheus_client in one go.

Why. In multiprocess mode every ``inc`` and ``observe`` of prometheus_client takes a lock
and writes a memory-mapped file (a histogram observation: two writes), and even in one
process an ``observe`` walks the bucket list in Python under a lock. One request touches
about fifteen series, so written one by one they cost 12 µs per request in one process and
23 µs in multiprocess mode (bench/metrics_sink_cost.py on the development machine). The
library has no call that writes several observations at once, so :class:`MetricBatch`
sums them per series in plain dicts (a counter: one float; a histogram: its sum and one
count per bucket) and :meth:`MetricBatch.flush` writes each series it touched once.
Under load many requests share a flush, so the writes per request fall towards zero.

The histogram flush adds a bucket's count and the sum through the child's ``_buckets``
and ``_sum`` values: prometheus_client offers no public call that adds n observations
to a bucket. That pins the library's Histogram layout, checked below at import (a
changed layout fails loudly at import rather than miscounting).

Not thread-safe: one batch belongs to one thread (the event loop's).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Histogram

from monitors.metrics import AUDIT_WRITE_DURATION


def check_histogram_layout(histogram: Histogram) -> None:
    """The flush writes into a Histogram child's values: make sure they are as expected.

    Checked on a live, label-less histogram and without writing: a probe metric of its
    own would land in the multiprocess files and in the exposition.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not bounds
        or bounds[-1] != float("inf")
        or not isinstance(buckets, list)
        or len(buckets) != len(bounds)
        or not all(callable(getattr(v, "inc", None)) for v in [*buckets, total])
    ):
        raise ImportError(
            "prometheus_client's Histogram no longer keeps _upper_bounds/_buckets/_sum as "
            "monitors/metrics_batch.py expects; update MetricBatch.flush for this version"
        )


check_histogram_layout(AUDIT_WRITE_DURATION)


class MetricBatch:
    """Counter increments and histogram observations summed per child until :meth:`flush`.

    Children are prometheus_client labelled children (``metric.labels(...)``) or
    label-less metrics; the batch keys its sums by the child object itself. A histogram's
    pending observations are its sum and a count per bucket index that was hit (few: a
    series' observations cluster), so a flush touches only those buckets.
    """

    __slots__ = ("_counters", "_histograms")

    def __init__(self) -> None:
        self._counters: dict[Any, float] = {}
        # child -> [sum, {bucket index: count}, the child's upper bounds]
        self._histograms: dict[Any, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._counters) + len(self._histograms)

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        counters = self._counters
        counters[counter] = counters.get(counter, 0.0) + amount

    def observe(self, histogram: Any, value: float) -> None:
        if value != value:  # NaN: no bucket would take it, and it would poison the sum
            return
        pending = self._histograms.get(histogram)
        if pending is None:
            pending = self._histograms[histogram] = [0.0, {}, histogram._upper_bounds]
        pending[0] += value
        # bisect_left finds the first bound >= value: prometheus_client's `value <= bound`.
        index = bisect_left(pending[2], value)
        counts = pending[1]
        counts[index] = counts.get(index, 0) + 1

    def flush(self) -> None:
        """Write every sum into its metric (one write per touched series and bucket)."""
        counters, histograms = self._counters, self._histograms
        self._counters, self._histograms = {}, {}
        for counter, amount in counters.items():
            counter.inc(amount)
        for histogram, (total, counts, _) in histograms.items():
            histogram._sum.inc(total)
            buckets = histogram._buckets
            for index, count in counts.items():
                buckets[index].inc(count)
