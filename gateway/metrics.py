"""Every metric, declared once (names and labels are part of the contract).

Label values are bounded: teams come from the config (plus `unknown`), routes from
`routes.ROUTES`, statuses are HTTP codes, cache results a fixed set.

One process keeps its values in plain numbers (`Family`), turned into samples when scraped:
prometheus-client's own metrics take a lock and check their state on every update, about 4,600
machine instructions for a counter's `inc` and 9,300 for a histogram's `observe`, a ninth of a
proxied request's instructions in all. The updates happen on the event loop's thread, as does
the scrape (the trace exporter counts its failed batches on its own thread: one writer, whose
value the scrape reads whole). With several worker processes (PROMETHEUS_MULTIPROC_DIR set) the
values must reach files that the scraped worker sums, so there prometheus-client's metrics keep
them.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as mp
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as om
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

# sub-millisecond (cache hits) to minutes (video generation through a slow upstream)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_TYPE = om.CONTENT_TYPE_LATEST
_LE = [floatToGoString(b) for b in (*BUCKETS, math.inf)]  # type: ignore[no-untyped-call]  # as the exposition writes them


def _bucket(amount: float) -> int:
    """The index of the bucket an observation counts in (`_LE[i]` its bound): the first bound
    at or above it, `le` being inclusive."""
    return bisect_left(BUCKETS, amount)


class Counted:
    """A counter's value in one process."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class Gauged:
    """A gauge's value in one process."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Observed:
    """A histogram's buckets (each its own count, not yet cumulative), sum and the last
    exemplar of each bucket, in one process."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.exemplars: dict[int, Exemplar] = {}

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        i = _bucket(amount)
        self.counts[i] += 1
        self.sum += amount
        if exemplar:
            self.exemplars[i] = Exemplar(exemplar, amount, time.time())


_CHILD = {"counter": Counted, "gauge": Gauged, "histogram": Observed}


class Family:
    """A metric of one process: its children by label values, and its samples when scraped
    (a collector of its registry)."""

    def __init__(self, kind: str, name: str, documentation: str,
                 labelnames: Sequence[str] = ()) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self._child = _CHILD[kind]
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self.labels()  # an unlabelled metric is shown from the start, as 0

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, given {values}")
            child = self._children[values] = self._child()
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in self._children.items():
            labels = [str(v) for v in values]
            if self.kind != "histogram":
                family.add_metric(labels, child.value)
                continue
            buckets: list[Any] = []
            total = 0
            for i, count in enumerate(child.counts):
                total += count
                exemplar = child.exemplars.get(i)
                buckets.append((_LE[i], total) if exemplar is None else (_LE[i], total, exemplar))
            family.add_metric(labels, buckets, child.sum)
        return [family]

    def _family(self) -> Any:
        kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                "histogram": HistogramMetricFamily}[self.kind]
        return kind(self.name, self.documentation, labels=self.labelnames)


# (histogram, its labels sorted, bucket `le`) -> the last exemplar observed in that bucket
Exemplars = dict[tuple[str, tuple[tuple[str, str], ...], str], Exemplar]


class Labelled:
    """A labelled metric of prometheus-client (several processes) whose children are created
    once per label set: its `labels()` takes a lock and builds a key on every call.

    `exemplars`: where a histogram's exemplars are kept by this process, in multiprocess mode
    (prometheus-client drops them there: its file-backed values have no room for one)."""

    def __init__(self, metric: Any, *, exemplars: Exemplars | None = None) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._exemplars = exemplars

    def __getattr__(self, name: str) -> Any:  # describe(), _labelnames, ...: the metric's own
        return getattr(self.metric, name)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self.metric.labels(*values)
            if self._exemplars is not None:
                labels = tuple(sorted(zip(self.metric._labelnames, values, strict=True)))
                child = _Remembering(child, (self.metric._name, labels), self._exemplars)
            self._children[values] = child
        return child


def _labelled(metric: Any, labelnames: Sequence[str]) -> Any:
    return Labelled(metric) if labelnames else metric


class _Remembering:
    """A histogram child that also keeps each bucket's last exemplar."""

    __slots__ = ("_child", "_exemplars", "_key")

    def __init__(self, child: Any, key: tuple[str, tuple[tuple[str, str], ...]],
                 exemplars: Exemplars) -> None:
        self._child, self._key, self._exemplars = child, key, exemplars

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self._child.observe(amount)
        if exemplar:
            self._exemplars[(*self._key, _LE[_bucket(amount)])] = Exemplar(
                exemplar, amount, time.time())


class _WithExemplars:
    """The multiprocess collector's families, with this process's exemplars on their buckets
    (the worker that answers a scrape shows its own)."""

    def __init__(self, collector: Any, exemplars: Exemplars) -> None:
        self._collector, self._exemplars = collector, exemplars

    def collect(self) -> Iterator[Any]:
        for family in self._collector.collect():
            if family.type == "histogram":
                family.samples = [self._with(family.name, s) for s in family.samples]
            yield family

    def _with(self, name: str, sample: Sample) -> Sample:
        if not sample.name.endswith("_bucket"):
            return sample
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        exemplar = self._exemplars.get((name, labels, sample.labels.get("le", "")))
        return sample if exemplar is None else sample._replace(exemplar=exemplar)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output and no panel uses them
        # In multiprocess mode values live in files and a fresh collector reads them per scrape.
        self._multiprocess = multiprocess_dir() is not None
        self._registry = None if self._multiprocess else CollectorRegistry()
        self._exemplars: Exemplars | None = {} if self._multiprocess else None
        self._families: list[Family] = []  # one process's, as declared
        self.requests = self._counter(
            "gateway_requests_total", "Requests answered by the gateway.",
            ["team", "route", "status", "cache"])
        self.request_duration = self._histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the answer.",
            ["route"])
        self.upstream_requests = self._counter(
            "gateway_upstream_requests_total",
            "Requests sent to the upstream API, by its answer (`error` when none came).",
            ["route", "status"])
        self.upstream_duration = self._histogram(
            "gateway_upstream_duration_seconds", "Time the upstream API took to answer.",
            ["route"])
        self.cache_events = self._counter(
            "gateway_cache_events_total",
            "Cache lookups and writes: hit, miss, coalesced, bypass, stored.",
            ["route", "result"])
        self.credits_charged = self._counter(
            "gateway_credits_charged_total", "Credits settled against team budgets.",
            ["team"])
        self.credits_saved = self._counter(
            "gateway_credits_saved_total",
            "Credits not spent upstream because the answer came from cache.",
            ["team"])
        self.rejections = self._counter(
            "gateway_rejections_total", "Requests the gateway refused, by reason.",
            ["team", "reason"])
        self.budget_remaining = self._gauge(
            "gateway_budget_remaining_credits",
            "Credits left in the team's current budget period (from the shared store).",
            ["team"], mode="mostrecent")
        self.budget_limit = self._gauge(
            "gateway_budget_limit_credits", "The team's budget for one period (from the config).",
            ["team"], mode="mostrecent")
        self.inflight = self._gauge(
            "gateway_inflight_requests", "Requests being answered right now.", mode="livesum")
        self.store_errors = self._counter(
            "gateway_store_errors_total", "Store operations that failed (unreachable or slow).",
            ["operation"])
        self.store_duration = self._histogram(
            "gateway_store_duration_seconds",
            "Time one call to the shared store took, answered or failed: admit (a request's "
            "admission, before it is answered) and finish (settlements: a batch after the "
            "answers, or one that an answer waits for, such as a new task's owner).",
            ["operation"])
        self.bookkeeping_pending = self._gauge(
            "gateway_bookkeeping_pending",
            "Completed requests whose bookkeeping (settlement, cache, ledger) has not yet "
            "reached the store.", mode="livesum")
        self.keys_expiring = self._gauge(
            "gateway_keys_expiring",
            "Team keys whose expires_at comes within 7 or 30 days (not yet expired).",
            ["within"], mode="mostrecent")
        self.webhook_deliveries = self._counter(
            "gateway_webhook_deliveries_total",
            "Task webhook deliveries: delivered, retried (an attempt failed; another follows) "
            "and failed (given up; listed by GET /admin/v1/webhooks/failed).",
            ["result"])
        self.store_fallback = self._counter(
            "gateway_store_fallback_requests_total",
            "Requests served without the shared store (store.on_error: open).")

        # the upstream accounts and the fair queue in front of them (gateway/fairness.py)
        self.upstream_slots = self._counter(
            "gateway_upstream_slots_total",
            "Upstream slots granted, by account and by the team whose request took it.",
            ["account", "team"])
        self.upstream_wait = self._histogram(
            "gateway_upstream_wait_seconds",
            "Time a request waited for its upstream slot (0 when one was free).",
            ["team"])
        self.upstream_waiting = self._gauge(
            "gateway_upstream_waiting", "Requests waiting for an upstream slot right now.",
            ["team"], mode="livesum")
        self.upstream_account_up = self._gauge(
            "gateway_upstream_account_up",
            "1 while the upstream account is in rotation, 0 while it is out (it refused its key "
            "or had no credits).",
            ["account"], mode="mostrecent")
        self.upstream_account_requests = self._counter(
            "gateway_upstream_account_requests_total",
            "Requests sent through each upstream account, by its answer (`error`: none came).",
            ["account", "status"])
        self.upstream_account_wait = self._histogram(
            "gateway_upstream_account_wait_seconds",
            "Time requests waited for a slot of each upstream account.",
            ["account"])
        self.upstream_account_slots_free = self._gauge(
            "gateway_upstream_account_slots_free",
            "Slots of the account's per-minute limit not used in the last minute (store).",
            ["account"], mode="mostrecent")
        self.upstream_account_limit = self._gauge(
            "gateway_upstream_account_limit",
            "The account's requests_per_minute (from the config).",
            ["account"], mode="mostrecent")
        self.upstream_account_spent = self._counter(
            "gateway_upstream_account_spent_total",
            "Credits charged for answers that came through each upstream account.",
            ["account"])
        self.upstream_account_balance = self._gauge(
            "gateway_upstream_account_balance",
            "The account's balance to watch (its `credits` in the config).",
            ["account"], mode="mostrecent")
        self.upstream_account_balance_left = self._gauge(
            "gateway_upstream_account_balance_remaining",
            "What is left of the account's balance to watch, by the gateway's count (store).",
            ["account"], mode="mostrecent")

        # the ledger shipper (gateway/ledger/): only the replica holding its lock reports a backlog
        self.ledger_pending = self._gauge(
            "gateway_ledger_pending",
            "Ledger entries in the store not yet written to PostgreSQL, as far as read.",
            mode="livemax")
        self.ledger_lag = self._gauge(
            "gateway_ledger_lag_seconds",
            "Age of the oldest ledger entry not yet written to PostgreSQL (0: caught up).",
            mode="livemax")
        self.ledger_rows = self._counter(
            "gateway_ledger_rows_total", "Ledger rows written to PostgreSQL.")
        self.ledger_errors = self._counter(
            "gateway_ledger_errors_total",
            "Ledger shipping passes that failed on PostgreSQL (unreachable, slow or refused).")

        # tracing (gateway/tracing.py): spans the collector will never see
        self.trace_spans_dropped = self._counter(
            "gateway_trace_spans_dropped_total",
            "Sampled spans dropped: the export queue was full, or the collector refused or "
            "did not answer their batch.",
            ["reason"])

    # Each returns what the code updates: a labelled metric (`.labels(...)` gives a child) or,
    # without labels, the one child.

    def _counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Any:
        if self._multiprocess:
            return _labelled(Counter(name, documentation, labelnames, registry=None), labelnames)
        return self._own("counter", name, documentation, labelnames)

    def _gauge(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
               mode: Literal["livesum", "livemax", "mostrecent"]) -> Any:
        if self._multiprocess:
            return _labelled(Gauge(name, documentation, labelnames, multiprocess_mode=mode,
                                   registry=None), labelnames)
        return self._own("gauge", name, documentation, labelnames)

    def _histogram(self, name: str, documentation: str, labelnames: Sequence[str]) -> Any:
        if self._multiprocess:
            return Labelled(Histogram(name, documentation, labelnames, buckets=BUCKETS,
                                      registry=None), exemplars=self._exemplars)
        return self._own("histogram", name, documentation, labelnames)

    def _own(self, kind: str, name: str, documentation: str, labelnames: Sequence[str]) -> Any:
        assert self._registry is not None
        family = Family(kind, name, documentation, labelnames)
        self._registry.register(family)
        self._families.append(family)
        return family if labelnames else family.labels()

    def close(self) -> None:
        """A worker that stops takes its live gauges (in-flight) out of the sums."""
        if self._multiprocess:
            mp.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        if self._registry is not None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def render_openmetrics(self) -> bytes:
        """The OpenMetrics exposition (`OPENMETRICS_TYPE`): the one that carries exemplars."""
        if self._registry is not None:
            return om.generate_latest(self._registry)  # type: ignore[no-any-return,no-untyped-call]
        assert self._exemplars is not None
        registry = CollectorRegistry()
        collector = mp.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        registry.register(_WithExemplars(collector, self._exemplars))
        return om.generate_latest(registry)  # type: ignore[no-any-return,no-untyped-call]
