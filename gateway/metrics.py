"""Every metric, declared once (names and labels are part of the contract).

Label values are bounded: teams come from the config (plus `unknown`), routes from
`routes.ROUTES`, statuses are HTTP codes, cache results a fixed set. With several worker
processes (PROMETHEUS_MULTIPROC_DIR set) prometheus-client sums them at scrape time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

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
from prometheus_client.openmetrics import exposition as om
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

# sub-millisecond (cache hits) to minutes (video generation through a slow upstream)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_TYPE = om.CONTENT_TYPE_LATEST


# (histogram, its labels sorted, bucket `le`) -> the last exemplar observed in that bucket
Exemplars = dict[tuple[str, tuple[tuple[str, str], ...], str], Exemplar]


class Labelled:
    """A labelled metric whose children are created once per label set: `labels()` of
    prometheus-client takes a lock and builds a key on every call, which the hot path feels.

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


class _Remembering:
    """A histogram child that also keeps each bucket's last exemplar."""

    __slots__ = ("_child", "_exemplars", "_key")

    def __init__(self, child: Any, key: tuple[str, tuple[tuple[str, str], ...]],
                 exemplars: Exemplars) -> None:
        self._child, self._key, self._exemplars = child, key, exemplars

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self._child.observe(amount)
        if exemplar:
            le = next((b for b in BUCKETS if amount <= b), math.inf)
            bucket = floatToGoString(le)  # type: ignore[no-untyped-call]  # as the exposition writes it
            self._exemplars[(*self._key, bucket)] = Exemplar(
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
        registry = None if self._multiprocess else CollectorRegistry()
        self._registry = registry
        self._exemplars: Exemplars | None = {} if self._multiprocess else None
        self.requests = Labelled(Counter(
            "gateway_requests_total", "Requests answered by the gateway.",
            ["team", "route", "status", "cache"], registry=registry))
        self.request_duration = Labelled(Histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the answer.",
            ["route"], buckets=BUCKETS, registry=registry), exemplars=self._exemplars)
        self.upstream_requests = Labelled(Counter(
            "gateway_upstream_requests_total",
            "Requests sent to the upstream API, by its answer (`error` when none came).",
            ["route", "status"], registry=registry))
        self.upstream_duration = Labelled(Histogram(
            "gateway_upstream_duration_seconds", "Time the upstream API took to answer.",
            ["route"], buckets=BUCKETS, registry=registry), exemplars=self._exemplars)
        self.cache_events = Labelled(Counter(
            "gateway_cache_events_total",
            "Cache lookups and writes: hit, miss, coalesced, bypass, stored.",
            ["route", "result"], registry=registry))
        self.credits_charged = Labelled(Counter(
            "gateway_credits_charged_total", "Credits settled against team budgets.",
            ["team"], registry=registry))
        self.credits_saved = Labelled(Counter(
            "gateway_credits_saved_total",
            "Credits not spent upstream because the answer came from cache.",
            ["team"], registry=registry))
        self.rejections = Labelled(Counter(
            "gateway_rejections_total", "Requests the gateway refused, by reason.",
            ["team", "reason"], registry=registry))
        self.budget_remaining = Labelled(Gauge(
            "gateway_budget_remaining_credits",
            "Credits left in the team's current budget period (from the shared store).",
            ["team"], multiprocess_mode="mostrecent", registry=registry))
        self.budget_limit = Labelled(Gauge(
            "gateway_budget_limit_credits", "The team's budget for one period (from the config).",
            ["team"], multiprocess_mode="mostrecent", registry=registry))
        self.inflight = Gauge(
            "gateway_inflight_requests", "Requests being answered right now.",
            multiprocess_mode="livesum", registry=registry)
        self.store_errors = Labelled(Counter(
            "gateway_store_errors_total", "Store operations that failed (unreachable or slow).",
            ["operation"], registry=registry))
        self.bookkeeping_pending = Gauge(
            "gateway_bookkeeping_pending",
            "Completed requests whose bookkeeping (settlement, cache, ledger) has not yet "
            "reached the store.",
            multiprocess_mode="livesum", registry=registry)
        self.keys_expiring = Labelled(Gauge(
            "gateway_keys_expiring",
            "Team keys whose expires_at comes within 7 or 30 days (not yet expired).",
            ["within"], multiprocess_mode="mostrecent", registry=registry))
        self.webhook_deliveries = Labelled(Counter(
            "gateway_webhook_deliveries_total",
            "Task webhook deliveries: delivered, retried (an attempt failed; another follows) "
            "and failed (given up; listed by GET /admin/v1/webhooks/failed).",
            ["result"], registry=registry))
        self.store_fallback = Counter(
            "gateway_store_fallback_requests_total",
            "Requests served without the shared store (store.on_error: open).",
            registry=registry)

        # the upstream accounts and the fair queue in front of them (gateway/fairness.py)
        self.upstream_slots = Labelled(Counter(
            "gateway_upstream_slots_total",
            "Upstream slots granted, by account and by the team whose request took it.",
            ["account", "team"], registry=registry))
        self.upstream_wait = Labelled(Histogram(
            "gateway_upstream_wait_seconds",
            "Time a request waited for its upstream slot (0 when one was free).",
            ["team"], buckets=BUCKETS, registry=registry))
        self.upstream_waiting = Labelled(Gauge(
            "gateway_upstream_waiting", "Requests waiting for an upstream slot right now.",
            ["team"], multiprocess_mode="livesum", registry=registry))
        self.upstream_account_up = Labelled(Gauge(
            "gateway_upstream_account_up",
            "1 while the upstream account is in rotation, 0 while it is out (it refused its key "
            "or had no credits).",
            ["account"], multiprocess_mode="mostrecent", registry=registry))
        self.upstream_account_requests = Labelled(Counter(
            "gateway_upstream_account_requests_total",
            "Requests sent through each upstream account, by its answer (`error`: none came).",
            ["account", "status"], registry=registry))
        self.upstream_account_wait = Labelled(Histogram(
            "gateway_upstream_account_wait_seconds",
            "Time requests waited for a slot of each upstream account.",
            ["account"], buckets=BUCKETS, registry=registry))
        self.upstream_account_slots_free = Labelled(Gauge(
            "gateway_upstream_account_slots_free",
            "Slots of the account's per-minute limit not used in the last minute (store).",
            ["account"], multiprocess_mode="mostrecent", registry=registry))
        self.upstream_account_limit = Labelled(Gauge(
            "gateway_upstream_account_limit",
            "The account's requests_per_minute (from the config).",
            ["account"], multiprocess_mode="mostrecent", registry=registry))
        self.upstream_account_spent = Labelled(Counter(
            "gateway_upstream_account_spent_total",
            "Credits charged for answers that came through each upstream account.",
            ["account"], registry=registry))
        self.upstream_account_balance = Labelled(Gauge(
            "gateway_upstream_account_balance",
            "The account's balance to watch (its `credits` in the config).",
            ["account"], multiprocess_mode="mostrecent", registry=registry))
        self.upstream_account_balance_left = Labelled(Gauge(
            "gateway_upstream_account_balance_remaining",
            "What is left of the account's balance to watch, by the gateway's count (store).",
            ["account"], multiprocess_mode="mostrecent", registry=registry))

        # the ledger shipper (gateway/ledger/): only the replica holding its lock reports a backlog
        self.ledger_pending = Gauge(
            "gateway_ledger_pending",
            "Ledger entries in the store not yet written to PostgreSQL, as far as read.",
            multiprocess_mode="livemax", registry=registry)
        self.ledger_lag = Gauge(
            "gateway_ledger_lag_seconds",
            "Age of the oldest ledger entry not yet written to PostgreSQL (0: caught up).",
            multiprocess_mode="livemax", registry=registry)
        self.ledger_rows = Counter(
            "gateway_ledger_rows_total", "Ledger rows written to PostgreSQL.", registry=registry)
        self.ledger_errors = Counter(
            "gateway_ledger_errors_total",
            "Ledger shipping passes that failed on PostgreSQL (unreachable, slow or refused).",
            registry=registry)

        # tracing (gateway/tracing.py): spans the collector will never see
        self.trace_spans_dropped = Labelled(Counter(
            "gateway_trace_spans_dropped_total",
            "Sampled spans dropped: the export queue was full, or the collector refused or "
            "did not answer their batch.",
            ["reason"], registry=registry))

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
