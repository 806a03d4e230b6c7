"""The server's /metrics: scrape, parse the Prometheus text format, and read the event-loop lag.

The lag metrics are `propensity_event_loop_lag_max_seconds` (gauge) and
`propensity_event_loop_lag_seconds` (histogram). When the server does not export them the
result says so ("not exported") instead of failing the bench.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Mapping

LAG_MAX = "propensity_event_loop_lag_max_seconds"
LAG_HISTOGRAM = "propensity_event_loop_lag_seconds"
LAG_DURING_PERIODIC = "propensity_event_loop_lag_during_periodic_work_seconds"
PERIODIC_STEP = "propensity_periodic_loop_step_seconds"
STALL_LIMIT_SECONDS = 0.005

Sample = tuple[str, dict[str, str], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def parse(text: str) -> list[Sample]:
    """(name, labels, value) of every sample line; comments and unparsable lines are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group(3) or "")}
        samples.append((match.group(1), labels, value))
    return samples


def max_value(samples: list[Sample], name: str) -> float | None:
    """Largest value of metric `name` over all its label sets (e.g. one per worker); None if absent."""
    values = [v for n, _, v in samples if n == name and not math.isnan(v)]
    return max(values) if values else None


def method_calls(samples: list[Sample], method: str, name: str = "propensity_requests_total") -> float | None:
    """RPCs of `method` (e.g. "Recommend") the server finished, any status code, summed; None if not exported."""
    values = [v for n, labels, v in samples if n == name and labels.get("method", "").rsplit("/", 1)[-1] == method]
    return sum(values) if values else None


def buckets(samples: list[Sample], name: str) -> dict[float, float]:
    """Cumulative histogram counts per upper bound `le`, summed over label sets; {} if absent."""
    out: dict[float, float] = {}
    for n, labels, value in samples:
        if n == f"{name}_bucket" and "le" in labels:
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + value
    return dict(sorted(out.items()))


def bucket_delta(before: Mapping[float, float], after: Mapping[float, float]) -> dict[float, float]:
    """Cumulative counts observed between two scrapes (bounds missing before count from 0)."""
    return {le: after[le] - before.get(le, 0.0) for le in sorted(after)}


def above(cumulative: Mapping[float, float], limit: float) -> float | None:
    """Observations above `limit` from cumulative buckets, when `limit` is a bucket bound; else None."""
    if limit not in cumulative or math.inf not in cumulative:
        return None
    return cumulative[math.inf] - cumulative[limit]


def upper_bound(cumulative: Mapping[float, float]) -> float | None:
    """The smallest bucket bound that holds every observation (the max is at most this); None if empty."""
    total = cumulative.get(math.inf, 0.0)
    if total <= 0:
        return None
    return next(le for le, count in sorted(cumulative.items()) if count >= total)


def per_label_max(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """Max of metric `name` per value of `label` (e.g. per worker); {} when absent or unlabelled."""
    out: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and label in labels and not math.isnan(value):
            out[labels[label]] = max(value, out.get(labels[label], -math.inf))
    return dict(sorted(out.items()))


def lag_report(before: str | None, after: str | None, limit: float = STALL_LIMIT_SECONDS) -> dict:
    """Event-loop lag from two scrapes, before and after the load phases.

    The gauge is the largest lag since each worker started serving (start-up included); the
    histogram's bucket counts, diffed between the scrapes, give the lag samples taken during the
    load, how many exceeded `limit`, and the bucket bound that holds them all. `stalls_over_limit`
    is the verdict's input: the histogram's count over the limit during the load when the limit is
    one of its bounds, else whether the gauge exceeds it.
    """
    if after is None:
        return {"exported": False, "why": "metrics endpoint not scraped"}
    after_samples = parse(after)
    gauge = max_value(after_samples, LAG_MAX)
    after_buckets = buckets(after_samples, LAG_HISTOGRAM)
    if gauge is None and not after_buckets:
        return {"exported": False, "why": f"{LAG_MAX} and {LAG_HISTOGRAM} not in /metrics"}
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    before_samples = parse(before) if before is not None else []
    report: dict = {
        "exported": True, "limit_ms": limit * 1000,
        "max_ms": ms(gauge),  # since start, max over workers
        "max_ms_before_load": ms(max_value(before_samples, LAG_MAX)),
        "max_ms_per_worker": {k: ms(v) for k, v in per_label_max(after_samples, LAG_MAX, "worker").items()},
    }
    over = None
    if after_buckets:
        delta = bucket_delta(buckets(before_samples, LAG_HISTOGRAM), after_buckets)
        over = above(delta, limit)
        bound = upper_bound(delta)
        report.update(
            samples_during_load=int(delta.get(math.inf, 0)),
            samples_over_limit_during_load=None if over is None else int(over),
            max_bucket_bound_ms_during_load=None if bound is None or math.isinf(bound) else ms(bound),
            over_largest_bucket=bool(bound is not None and math.isinf(bound)),
        )
        report["periodic"] = periodic_report(before_samples, after_samples, delta, limit)
    if over is not None:
        report["stalls_over_limit"] = int(over) > 0
        report["verdict_from"] = f"histogram: lag samples above {limit * 1000:g} ms between the scrapes"
    else:
        report["stalls_over_limit"] = bool(gauge is not None and gauge > limit)
        report["verdict_from"] = "gauge: largest lag since start"
    return report


def _labelled_buckets(samples: list[Sample], name: str, label: str) -> dict[str, dict[float, float]]:
    """`buckets` of histogram `name` per value of `label` (summed over the other labels)."""
    values = sorted({labels[label] for n, labels, _ in samples if n == f"{name}_bucket" and label in labels})
    return {value: buckets([s for s in samples if s[1].get(label) == value], name) for value in values}


def stall_excess_p_value(over_during: int, during: int, over_outside: int, outside: int) -> float:
    """One-sided Fisher exact test: the chance of at least `over_during` lag samples over the limit among the `during`
    samples taken while periodic work ran, if periodic work changed nothing (over-limit samples spread at random
    over all samples). Small: periodic work makes stalls; large: its samples look like the rest."""
    from scipy.stats import fisher_exact

    if during <= 0 or outside < 0:
        return 1.0
    _, p = fisher_exact([[over_during, during - over_during], [over_outside, outside - over_outside]], alternative="greater")
    return float(p)


def periodic_report(before: list[Sample], after: list[Sample], all_delta: Mapping[float, float], limit: float) -> dict:
    """Whether periodic work stalls the loop, between two scrapes (issue 10: no periodic task may stall a loop over `limit`).

    Two measurements from the server (server.loop_monitor): how long each periodic task's steps held the loop
    (`propensity_periodic_loop_step_seconds`), and the lag samples whose window overlapped periodic work in any
    of its parts (the loop, the background thread, the build process) against all the others. Under load
    requests make lag too (a timer behind two queued requests is late by both); periodic work stalls the
    loop if its samples go over the limit more often than the rest, or if one of its steps held the loop that long.
    """
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    after_by_task = _labelled_buckets(after, LAG_DURING_PERIODIC, "task")
    if "any" not in after_by_task:
        return {"exported": False, "why": f"{LAG_DURING_PERIODIC} not in /metrics"}
    before_by_task = _labelled_buckets(before, LAG_DURING_PERIODIC, "task")
    by_task = {task: bucket_delta(before_by_task.get(task, {}), cumulative) for task, cumulative in after_by_task.items()}
    during = by_task.pop("any")
    n_during, n_all = int(during.get(math.inf, 0)), int(all_delta.get(math.inf, 0))
    over_during, over_all = above(during, limit), above(all_delta, limit)
    steps_before = _labelled_buckets(before, PERIODIC_STEP, "task")
    steps = {task: bucket_delta(steps_before.get(task, {}), cumulative) for task, cumulative in _labelled_buckets(after, PERIODIC_STEP, "task").items()}
    step_bounds = {task: upper_bound(delta) for task, delta in steps.items()}
    step_over = {task: above(delta, limit) for task, delta in steps.items()}
    over_by_task = {task: above(delta, limit) for task, delta in by_task.items()}
    report: dict = {
        "exported": True,
        "samples_during_periodic": n_during,
        "samples_over_limit_during_periodic": None if over_during is None else int(over_during),
        "samples_outside_periodic": n_all - n_during,
        "samples_over_limit_outside_periodic": None if over_during is None or over_all is None else int(over_all - over_during),
        "samples_during_task": {task: int(delta.get(math.inf, 0)) for task, delta in by_task.items()},
        "samples_over_limit_during_task": {task: (None if over is None else int(over)) for task, over in over_by_task.items()},
        "steps_per_task": {task: int(delta.get(math.inf, 0)) for task, delta in steps.items()},
        "step_max_bucket_bound_ms_per_task": {task: (None if b is None or math.isinf(b) else ms(b)) for task, b in step_bounds.items()},
        "steps_over_limit": int(sum(v or 0 for v in step_over.values())),
    }
    if over_during is not None and over_all is not None:
        outside = n_all - n_during
        report["share_over_limit_during_periodic"] = round(over_during / n_during, 5) if n_during else None
        report["share_over_limit_outside_periodic"] = round((over_all - over_during) / outside, 5) if outside else None
        report["excess_p_value"] = round(stall_excess_p_value(int(over_during), n_during, int(over_all - over_during), outside), 4)
    return report
