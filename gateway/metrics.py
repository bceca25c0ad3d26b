"""Every metric, declared once (names and labels are part of the contract).

Label values are bounded: teams come from the config (plus `unknown`), routes from
`routes.ROUTES`, statuses are HTTP codes, cache results a fixed set. With several worker
processes (PROMETHEUS_MULTIPROC_DIR set) prometheus-client sums them at scrape time.
"""

from __future__ import annotations

import os
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

# sub-millisecond (cache hits) to minutes (video generation through a slow upstream)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Labelled:
    """A labelled metric whose children are created once per label set: `labels()` of
    prometheus-client takes a lock and builds a key on every call, which the hot path feels."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __getattr__(self, name: str) -> Any:  # describe(), _labelnames, ...: the metric's own
        return getattr(self.metric, name)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output and no panel uses them
        # In multiprocess mode values live in files and a fresh collector reads them per scrape.
        self._multiprocess = multiprocess_dir() is not None
        registry = None if self._multiprocess else CollectorRegistry()
        self._registry = registry
        self.requests = Labelled(Counter(
            "gateway_requests_total", "Requests answered by the gateway.",
            ["team", "route", "status", "cache"], registry=registry))
        self.request_duration = Labelled(Histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the answer.",
            ["route"], buckets=BUCKETS, registry=registry))
        self.upstream_requests = Labelled(Counter(
            "gateway_upstream_requests_total",
            "Requests sent to the upstream API, by its answer (`error` when none came).",
            ["route", "status"], registry=registry))
        self.upstream_duration = Labelled(Histogram(
            "gateway_upstream_duration_seconds", "Time the upstream API took to answer.",
            ["route"], buckets=BUCKETS, registry=registry))
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
