"""Task completion webhooks: the gateway polls a task created with `X-Callback-URL` and POSTs its
final body there, signed as Standard Webhooks sign (https://www.standardwebhooks.com/).

**Shared work.** A hook (store/hooks.py) is recorded before the task's creation is answered
(so a client that got its task id gets its webhook, at least once). Every replica claims what
is due from the store, each hook under a lease that outlasts one poll and one delivery attempt:
a replica that dies mid-step leaves its hooks to come due again at the lease's end, for any
replica to take up. A holder too slow for its lease changes nothing once another has taken
over (the store checks the lease), so each step is done at least once, rarely twice.

**Polling.** A hook's task is polled through the proxy's own path for `GET /tasks/{id}`
(`Proxy.poll`), as the team: a cached answer (a client's poll, or an earlier one of the
gateway's) answers it, an identical poll in flight on any replica is followed, and only
otherwise does it go upstream, taking an upstream slot only if one is free at once (pacing
without a queue: a client never waits behind a background poll; a refused poll tries again at
its next turn). So one task costs at most one upstream poll per interval, whoever asks, and its
final status is settled there, exactly as a client's poll settles it (`settlement.decide`,
then the bookkeeping). Polls come `webhooks.poll_interval_s` apart (never closer than
`cache.pending_task_ttl_s`, the life of a poll's cache entry), then a fifth of the task's age
apart, up to `webhooks.max_poll_interval_s`; a task still running after
`webhooks.max_task_age_s` fails its hook.

**Delivery.** `POST <url>` with the final body as the upstream gave it, `Content-Type:
application/json`, and `webhook-id` (the hook's id, the same on every attempt and redelivery),
`webhook-timestamp` (the attempt's, in seconds) and `webhook-signature: v1,<base64 of
HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`. Any 2xx is delivered; anything else (another
status, a timeout, no connection, an address that is not allowed) is tried again after
`first_retry_s`, doubling up to `max_retry_interval_s`, until `retry_for_s` after the first
attempt; then the hook fails: counted, logged, listed by `GET /admin/v1/webhooks/failed`, and
`POST /admin/v1/webhooks/{id}/redeliver` puts it back to work. Each attempt checks the URL
against the team's current rules, resolves it, checks every address and connects only to those
(callbacks.py): no redirects, no proxies from the environment, no cookies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import aiohttp
import certifi
import orjson
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from . import __version__, callbacks, routes
from . import config as cfg
from .asgi import Reply
from .errors import GatewayError, NotFound, RateLimited
from .request import Head, ParsedRequest, parse
from .settlement import TaskState, read_answer
from .store import StoreError
from .store.base import ScriptFailed
from .store.hooks import Claimed, Hook, State, Step, Update

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("gateway.webhooks")
POLLER_KEY_ID = "(webhooks)"  # the key id of the gateway's own polls: no configured key has it
LEASE_MARGIN_S = 5.0
MAX_FAILED = 100_000  # failed hooks kept at most (besides `webhooks.keep_failed_s`)
ANSWER_BYTES = 65536  # what is read of a receiver's answer (then dropped)
# failures no retry can mend: the hook fails at once
PERMANENT = frozenset({"callbacks_off", "secret_gone", "bad_url", "not_allowed"})

Poll = Callable[[ParsedRequest], Awaitable[Reply]]


def new_id() -> str:
    return "msg_" + os.urandom(16).hex()


def signature(secret: bytes, hook_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature` (Standard Webhooks, v1): HMAC-SHA256 of "<id>.<timestamp>.<body>"."""
    signed = b"%s.%d." % (hook_id.encode(), timestamp) + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


class Webhooks:
    """Watches tasks for their webhooks, and delivers them, sharing the work with every replica
    through the store. `poll` is `Proxy.poll`; `lookup` resolves host names (tests)."""

    def __init__(self, runtime: Runtime, poll: Poll, *,
                 lookup: callbacks.Lookup | None = None) -> None:
        self.rt = runtime
        self._poll = poll
        self._lookup = lookup
        self.owner = f"{runtime.process}.{os.urandom(4).hex()}"  # named in the leases it holds
        self._running: set[asyncio.Task[None]] = set()
        self._unrecorded: list[Hook] = []  # hooks the store was away for: recorded when back
        self._wake = asyncio.Event()  # work may be due now (a redelivery)
        self._freed = asyncio.Event()  # a step ended: room for another
        self._tls = ssl.create_default_context(cafile=certifi.where())

    @property
    def settings(self) -> cfg.Webhooks:
        return self.rt.policy.config.webhooks

    # -- the request path ------------------------------------------------------------------------

    async def check(self, callback: callbacks.Callback) -> None:
        """Refuse (`callbacks.Refused`, 400) a callback whose host resolves to an address it
        may not reach; the delivery checks again, each time it connects."""
        await callbacks.addresses(callback.target, callback.named, lookup=self._lookup)

    async def watch(self, team: str, task_id: str, callback: callbacks.Callback) -> None:
        """Watch a new task for its webhook (before its creation is answered). With the store
        away, the hook waits in this process until the store is back."""
        hook = Hook(new_id(), team, task_id, callback.target.url, callback.secret_id)
        try:
            await self._record(hook)
        except StoreError:
            self.rt.metrics.store_errors.labels("webhooks").inc()
            log.warning("store unreachable: a task's webhook is kept here until it is back",
                        extra={"fields": {"webhook_id": hook.id, "team": team}})
            self._unrecorded.append(hook)

    # -- operators -------------------------------------------------------------------------------

    async def failed(self, *, after: tuple[int, str] | None, limit: int) -> list[Hook]:
        return await self.rt.store.hooks_failed(after=after, limit=limit)

    async def redeliver(self, hook_id: str) -> bool:
        done = await self.rt.store.hook_redeliver(hook_id)
        if done:
            self._wake.set()
        return done

    # -- the work --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim what is due and work on it, at most `webhooks.concurrency` hooks at once."""
        while True:
            claimed = 0
            try:
                await self._record_unrecorded()
                claimed = await self._start_due()
            except StoreError:
                self.rt.metrics.store_errors.labels("webhooks").inc()
            except Exception:  # a bad round must not end the loop
                log.exception("webhook round failed")
            full = len(self._running) >= self.settings.concurrency
            if claimed and not full:
                continue  # there may be more due
            event = self._freed if full else self._wake
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self.settings.tick_s)

    async def once(self) -> int:
        """One round, to its end (tests): claim what is due, work on it, and wait for every
        step this process has under way. Returns how many hooks this round claimed."""
        await self._record_unrecorded()
        claimed = await self._start_due()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        return claimed

    async def close(self) -> None:
        """At shutdown: stop the steps under way (their leases bring them back, here or
        elsewhere) and record what the store was away for, if it is back."""
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        with contextlib.suppress(StoreError):
            await self._record_unrecorded()
        if self._unrecorded:
            log.error("shutdown: %d task webhooks could not be recorded in the store",
                      len(self._unrecorded), extra={"fields": {"lost": len(self._unrecorded)}})

    async def _record_unrecorded(self) -> None:
        while self._unrecorded:
            await self._record(self._unrecorded[0])
            self._unrecorded.pop(0)

    async def _record(self, hook: Hook) -> None:
        """Record a hook; raises `StoreError` only (a defect is logged: the hook is lost)."""
        try:
            await self.rt.store.hook_watch(hook, self._interval_ms(0.0))
        except ScriptFailed:
            log.exception("a task's webhook could not be recorded",
                          extra={"fields": {"webhook_id": hook.id, "team": hook.team}})

    async def _start_due(self) -> int:
        free = self.settings.concurrency - len(self._running)
        if free <= 0:
            return 0
        claimed = await self.rt.store.hook_claim(self.owner, self._lease_ms(), free)
        for item in claimed:
            task = asyncio.get_running_loop().create_task(self._step(item))
            self._running.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._freed.set()

    def _lease_ms(self) -> int:
        """One poll (bounded by a request's lock), one delivery attempt, and a margin."""
        seconds = (self.settings.timeout_s + callbacks.RESOLVE_TIMEOUT_S + LEASE_MARGIN_S)
        return self.rt.policy.hold_ms + int(seconds * 1000)

    def _interval_ms(self, age_s: float) -> int:
        """The time to the next poll of a task this old."""
        s = self.settings
        floor = max(s.poll_interval_s, self.rt.policy.config.cache.pending_task_ttl_s)
        return int(max(floor, min(age_s / 5, s.max_poll_interval_s)) * 1000)

    async def _step(self, item: Claimed) -> None:
        hook, body = item.hook, item.body
        try:
            if hook.state is State.POLLING:
                body = await self._poll_step(hook, item.now_ms)
                if body is None:
                    return
            elif body is None:  # a record without its body: nothing can be delivered
                await self._give_up(hook, "no_body", attempted=False)
                return
            await self._deliver_step(hook, body, (item.now_ms - (hook.started_ms or item.now_ms))
                                     / 1000)
        except StoreError:  # the lease brings the hook back once the store is
            self.rt.metrics.store_errors.labels("webhooks").inc()
        except ScriptFailed:
            log.exception("a webhook step failed in the store")

    # -- polling ---------------------------------------------------------------------------------

    async def _poll_step(self, hook: Hook, now_ms: int) -> bytes | None:
        """Poll the hook's task; its final body, or None once the hook is rescheduled."""
        age_s = max(now_ms - hook.created_ms, 0) / 1000
        team = self.rt.policy.teams.get(hook.team)
        if team is None:
            await self._give_up(hook, "team_gone", attempted=False)
            return None
        error = "running"
        try:
            reply = await self._poll_task(team.name, hook)
        except NotFound:  # the team's ownership is not in the store (yet: written late while
            error = "not_owned"  # the store was away; or no more: the record expired)
        except RateLimited:
            error = "paced"
        except (GatewayError, TimeoutError):
            error = "poll_failed"
        else:
            answer = read_answer(reply.status, None, reply.body)
            if answer.ok and answer.state in (TaskState.DONE, TaskState.FAILED):
                moved = await self.rt.store.hook_update(hook, Update(
                    Step.DELIVER, delay_ms=self._lease_ms(), status=_status_word(reply.body),
                    body=reply.body))
                return reply.body if moved else None
            if reply.status == 404:
                await self._give_up(hook, "task_not_found", attempted=False)
                return None
            if not answer.ok:
                error = f"upstream_{reply.status}"
        if age_s >= self.settings.max_task_age_s:
            await self._give_up(hook, "task_not_finished", attempted=False)
            return None
        await self.rt.store.hook_update(hook, Update(Step.POLL, delay_ms=self._interval_ms(age_s),
                                                     error=error))
        return None

    async def _poll_task(self, team: str, hook: Hook) -> Reply:
        """`GET /tasks/{id}` as the team, through the proxy's path (`Proxy.poll`), with an
        upstream slot only if one is free now; raises the `GatewayError` a client would get."""
        policy = self.rt.policy
        req = parse(policy, policy.teams[team], POLLER_KEY_ID, request_id=hook.id, method="GET",
                    path=f"{routes.TASKS}/{hook.task_id}", route=routes.TASKS, query=b"",
                    head=Head([]), raw_headers=[], body=b"", payload=None, model=None,
                    ticket=self.rt.ticket(), now=self.rt.clock())
        slot = req.admission.slot  # a slot now, or none: client requests never wait for polls
        admission = replace(req.admission, count_quota=False,  # not the team's own request
                            slot=None if slot is None else replace(slot, queue_ms=0.0))
        async with asyncio.timeout(policy.hold_ms / 1000):
            return await self._poll(replace(req, admission=admission))

    # -- delivery --------------------------------------------------------------------------------

    async def _deliver_step(self, hook: Hook, body: bytes, elapsed_s: float) -> None:
        error = await self._deliver(hook, body)
        metric = self.rt.metrics.webhook_deliveries
        fields = {"webhook_id": hook.id, "team": hook.team, "task_id": hook.task_id,
                  "attempts": hook.attempts + 1}
        if error is None:
            if await self.rt.store.hook_update(hook, Update(Step.DELIVERED)):
                metric.labels("delivered").inc()
                log.info("webhook delivered", extra={"fields": fields})
            return
        s = self.settings
        if error in PERMANENT or elapsed_s >= s.retry_for_s:
            await self._give_up(hook, error, attempted=True)
            return
        delay_s = min(s.first_retry_s * 2.0 ** min(hook.attempts, 40), s.max_retry_interval_s)
        delay_s = min(delay_s * random.uniform(0.8, 1.0), s.retry_for_s - elapsed_s)
        if await self.rt.store.hook_update(hook, Update(
                Step.RETRY, delay_ms=int(delay_s * 1000), error=error, attempted=True)):
            metric.labels("retried").inc()
            log.info("webhook delivery failed; it is tried again",
                     extra={"fields": {**fields, "error": error, "retry_in_s": round(delay_s, 1)}})

    async def _give_up(self, hook: Hook, error: str, *, attempted: bool) -> None:
        if await self.rt.store.hook_update(hook, Update(
                Step.FAILED, error=error, attempted=attempted,
                keep_ms=int(self.settings.keep_failed_s * 1000), max_failed=MAX_FAILED)):
            self.rt.metrics.webhook_deliveries.labels("failed").inc()
            log.warning("webhook failed", extra={"fields": {
                "webhook_id": hook.id, "team": hook.team, "task_id": hook.task_id,
                "error": error, "attempts": hook.attempts + attempted}})

    async def _deliver(self, hook: Hook, body: bytes) -> str | None:
        """One delivery attempt; None when it was taken (2xx), else why not (a short code)."""
        team = self.rt.policy.config.teams.get(hook.team)
        rules = self.rt.policy.teams[hook.team].callbacks if team is not None else None
        if team is None or team.callbacks is None or rules is None:
            return "callbacks_off"
        secret = (team.callbacks.secret if hook.secret_id == ""
                  else team.callbacks.secrets.get(hook.secret_id))
        if secret is None:
            return "secret_gone"
        try:
            target = callbacks.parse(hook.url)
            if not rules.allows(target):
                return "not_allowed"
            addresses = await callbacks.addresses(target, rules.named(target),
                                                  lookup=self._lookup)
        except callbacks.Refused as exc:
            return exc.code
        timestamp = int(self.rt.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": f"aio-gateway/{__version__}",
            "webhook-id": hook.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(callbacks.secret_bytes(secret), hook.id, timestamp,
                                           body),
        }
        try:
            status = await post(target, addresses, headers, body,
                                timeout_s=self.settings.timeout_s, tls=self._tls)
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError):
            return "connect"
        return None if 200 <= status < 300 else f"http_{status}"

async def post(target: callbacks.Target, addresses: list[callbacks.IPAddress],
               headers: dict[str, str], body: bytes, *, timeout_s: float,
               tls: ssl.SSLContext) -> int:
    """POST to `target`, connecting to nothing but `addresses` (checked): the resolver answers
    with them, and the socket factory refuses any other. Returns the answer's status."""
    checked = {str(a) for a in addresses}

    def connect_to(info: tuple[int, int, int, str, tuple[object, ...]]) -> socket.socket:
        family, kind, proto, _, address = info
        if str(ipaddress.ip_address(str(address[0]).partition("%")[0])) not in checked:
            raise OSError(errno.EACCES, "the callback's address was not checked")
        return socket.socket(family, kind, proto)

    connector = aiohttp.TCPConnector(resolver=_Pinned(addresses), use_dns_cache=False, ssl=tls,
                                     force_close=True, limit=1, socket_factory=connect_to)
    async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as session, session.post(yarl.URL(target.url, encoded=True), data=body, headers=headers,
                               allow_redirects=False) as answer:
        await answer.content.read(ANSWER_BYTES)
        return answer.status


class _Pinned(AbstractResolver):
    """A resolver that answers with the addresses already checked, and asks nobody."""

    def __init__(self, addresses: list[callbacks.IPAddress]) -> None:
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(
            hostname=host, host=str(a), port=port,
            family=socket.AF_INET6 if a.version == 6 else socket.AF_INET, proto=0,
            flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV) for a in self._addresses]

    async def close(self) -> None:
        return None


def _status_word(body: bytes) -> str:
    """The task's final `status`, for operators (bounded; '' when it has none)."""
    try:
        status = orjson.loads(body).get("status")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return status[:32] if isinstance(status, str) and status.isascii() else ""
