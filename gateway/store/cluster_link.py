"""Every call to a Redis Cluster over one shared connection per master.

A script's keys all lie in one hash slot (cluster.py); its call goes to the master that serves
that slot, over that master's `Multiplexed` connection, as calls to a single server do (redis-py's
cluster client takes a pooled connection per concurrent call instead, which a burst on a busy
host turned into timeouts). The slot map is redis-py's (`RedisCluster.nodes_manager`), read at
the first call and read again after a node's connection failed (a failover moves the masters)
or a node answered MOVED.

MOVED and ASK say the command did not run: it is sent again where the answer points (after an
ASK, to that node, preceded by ASKING on the same connection), at most `_REDIRECTS` times. A
command without keys (SCRIPT LOAD) goes to every node its batch's other commands go to, or to
every master when none has keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import RedisError

from .base import StoreError
from .multiplex import Multiplexed

_REDIRECTS = 3
Command = tuple[Any, ...]


def _key(command: Command) -> Any:
    """The first key of an EVALSHA (the slot of all its keys), else None."""
    if command[0] == "EVALSHA" and int(command[2]) > 0:
        return command[3]
    return None


def _redirect(reply: Any) -> tuple[str, str] | None:
    """("MOVED" or "ASK", "host:port") for a redirection, else None."""
    if reply.__class__ is hiredis.ReplyError:
        kind, _, rest = str(reply).partition(" ")
        if kind in ("MOVED", "ASK"):
            return kind, rest.rpartition(" ")[2]
    return None


class ClusterLink:
    """`Multiplexed`'s `call` and `execute`, for a cluster: each command to its slot's master."""

    def __init__(self, cluster: RedisCluster, *, timeout_s: float) -> None:
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._links: dict[str, Multiplexed] = {}  # by node name, "host:port"
        self._stale = True  # the slot map is read again before the next command

    async def call(self, command: Command) -> Any:
        (reply,) = await self.execute([command])
        return reply

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, in order, as `Multiplexed.execute` gives them."""
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asked: dict[int, ClusterNode] = {}  # commands an ASK sent to another node
        for _ in range(_REDIRECTS + 1):
            for i in todo:
                replies[i] = None
            plan = await self._plan(commands, todo, asked)
            results = await asyncio.gather(*(self._send(node, [commands[i] for i in indices],
                                                        asking=asking)
                                             for node, indices, asking in plan),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            todo, asked = [], {}
            for (_, indices, _), result in zip(plan, results, strict=True):
                for i, reply in zip(indices, result, strict=True):  # type: ignore[arg-type]
                    redirect = _redirect(reply)
                    if redirect is not None and _key(commands[i]) is not None:
                        kind, where = redirect
                        if kind == "MOVED":
                            self._stale = True
                        else:
                            asked[i] = await self._node(where)
                        todo.append(i)
                    if replies[i] is None or reply.__class__ is hiredis.ReplyError:
                        replies[i] = reply  # a command sent to several nodes: an error first
            if not todo:
                return replies
        return replies  # still redirected: the MOVED or ASK reply is the answer

    async def _plan(self, commands: Sequence[Command], todo: list[int],
                    asked: dict[int, ClusterNode]) -> list[tuple[ClusterNode, list[int], bool]]:
        """Which commands go to which node: (node, command indices, after ASKING)."""
        nodes = await self._nodes()
        plan: dict[tuple[str, bool], tuple[ClusterNode, list[int], bool]] = {}
        keyless = []
        for i in todo:
            key = _key(commands[i])
            if key is None:
                keyless.append(i)
                continue
            node = asked.get(i) or nodes.get_node_from_slot(key_slot(_encoded(key)))
            plan.setdefault((node.name, i in asked), (node, [], i in asked))[1].append(i)
        if keyless:
            targets = [(node, asking) for node, _, asking in plan.values()] or [
                (node, False) for node in nodes.get_nodes_by_server_type(PRIMARY)]
            for node, asking in targets:
                group = plan.setdefault((node.name, asking), (node, [], asking))[1]
                group[:0] = keyless  # before the batch's other commands: SCRIPT LOAD first
        return list(plan.values())

    async def _send(self, node: ClusterNode, commands: list[Command], *,
                    asking: bool) -> list[Any]:
        link = self._link(node)
        try:
            if not asking:
                return await link.execute(commands)
            sent = [command for pair in (((b"ASKING",), c) for c in commands) for command in pair]
            return (await link.execute(sent))[1::2]
        except StoreError:
            self._stale = True  # the node may be gone: a replica may serve its slots now
            raise

    async def _nodes(self) -> NodesManager:
        """redis-py's slot map, read again when it may be out of date."""
        cluster = self._cluster
        if self._stale:
            try:
                if cluster._initialize:  # never read yet
                    await cluster.initialize()
                else:
                    await cluster.nodes_manager.initialize()
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreError(f"redis: {type(exc).__name__}", maybe_ran=False) from None
            self._stale = False
            known = {node.name for node in cluster.nodes_manager.nodes_cache.values()}
            for name in [n for n in self._links if n not in known]:
                await self._links.pop(name).close()
        return cluster.nodes_manager

    async def _node(self, name: str) -> ClusterNode:
        """The node an ASK names (one the slot map may not list yet)."""
        nodes = await self._nodes()
        node = nodes.nodes_cache.get(name)
        if node is None:
            self._stale = True
            raise StoreError("redis: AskError", maybe_ran=False)
        return node

    def _link(self, node: ClusterNode) -> Multiplexed:
        link = self._links.get(node.name)
        if link is None:
            kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            link = self._links[node.name] = Multiplexed(
                lambda: node.connection_class(**kwargs), timeout_s=self._timeout_s)
        return link

    async def close(self) -> None:
        links, self._links = self._links, {}
        for link in links.values():
            await link.close()


def _encoded(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()
