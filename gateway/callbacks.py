"""Where a task's webhook may go: `X-Callback-URL`, checked against the team's rules (SSRF).

A callback URL is read strictly (fullmatch): `http` or `https` in lowercase, a DNS name or an IP
literal (canonical dotted IPv4, or bracketed IPv6 without a zone), an optional port 1-65535, a
path and a query of URL characters (percent-escapes well formed), no credentials, no fragment,
at most `MAX_URL` characters. It must match one of the team's `callbacks.allow` patterns:

    https://*.research.example.com/hooks/   scheme, host, port and path prefix
    http://10.0.0.7:8080/                   an IP literal: names that address explicitly

A pattern's scheme and port must match exactly (no port: the scheme's default; `:*` any port);
its host matches the URL's whole host, `*` standing for any run of host characters (dots
included); its path is a prefix of the URL's path and query, `*` standing for any run of
characters within one segment.

Then the addresses: every address the host resolves to must be public (not private, loopback,
link-local, shared, reserved, multicast or unspecified, IPv4-mapped and NAT64 forms judged by the
IPv4 inside). The one exception is a URL whose host is itself an IP literal that a matching
pattern names (`http://10.0.0.7:8080/` above): a host name never leads to a private address,
so the port and path a pattern allows for an internal IP cannot be reached through a name that
happens to resolve to it. The check is made when the
request arrives (400 before anything is forwarded or reserved) and again for every delivery
attempt, on the addresses that attempt connects to: `addresses()` resolves and checks, and the
delivery connects only to what it returned (`webhooks.py` pins them), so a name that changes its
answer between the check and the connection (DNS rebinding) reaches nothing it was not allowed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int], Awaitable[list[str]]]  # host, port -> addresses (text)

MAX_URL = 2048
MAX_SECRET_ID = 64
RESOLVE_TIMEOUT_S = 5.0
DEFAULT_PORTS = {"http": 80, "https": 443}

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
# patterns are used with fullmatch
_URL = re.compile(
    rf"(?P<scheme>https?)://(?P<host>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])"
    rf"(?::(?P<port>[0-9]{{1,5}}))?(?P<rest>(?:/{_PCHAR}*)*(?:\?(?:{_PCHAR}|[/?])*)?)")
_PATTERN = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9*.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>\*|[0-9]{1,5}))?(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")
_NUMERIC = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}")
_SECRET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class Refused(InvalidRequest):
    """A callback URL the gateway will not call (400 `invalid_request` on the request path)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code  # short and bounded: a failed delivery's `error`


@dataclass(frozen=True, slots=True)
class Target:
    """A callback URL, read and normalised (the host in lowercase)."""

    url: str
    scheme: str
    host: str  # without brackets
    port: int
    ip: IPAddress | None  # the host, when it is an IP literal
    rest: str  # the path (at least '/') and the query

    def __repr__(self) -> str:  # the query may hold the receiver's own token
        return f"Target({self.origin}{self.rest.partition('?')[0]})"

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        default = DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" + ("" if default else f":{self.port}")


@dataclass(frozen=True, slots=True)
class Pattern:
    scheme: str
    host: re.Pattern[str]
    port: int | None  # None: any
    path: re.Pattern[str]
    ip: IPAddress | None  # the host, when the pattern names an IP

    def matches(self, target: Target) -> bool:
        return (target.scheme == self.scheme and (self.port is None or target.port == self.port)
                and self.host.fullmatch(target.host) is not None
                and self.path.match(target.rest) is not None)


@dataclass(frozen=True, slots=True)
class Rules:
    """A team's `callbacks`, compiled once per config load."""

    patterns: tuple[Pattern, ...]
    secret_ids: frozenset[str]  # ids `X-Callback-Secret-Id` may give ('' is `secret`)

    def allows(self, target: Target) -> bool:
        return any(p.matches(target) for p in self.patterns)

    def named(self, target: Target) -> frozenset[IPAddress]:
        """The non-public address `target` may lead to: its own IP, when a pattern that
        matches it names that IP (a host name never may)."""
        return frozenset(p.ip for p in self.patterns
                         if p.ip is not None and p.ip == target.ip and p.matches(target))


@dataclass(frozen=True, slots=True)
class Callback:
    """What a request asked for: where its task's webhook goes, signed with which secret."""

    target: Target
    secret_id: str  # '' for the team's `secret`
    named: frozenset[IPAddress]

    def __repr__(self) -> str:
        return f"Callback({self.target!r}, secret_id={self.secret_id!r})"


def compile_rules(allow: Sequence[str], secrets: Mapping[str, str]) -> Rules:
    return Rules(tuple(_pattern(text) for text in allow), frozenset(["", *secrets]))


def pattern_problem(text: str) -> str | None:
    """Why `text` is not a usable `callbacks.allow` pattern; None when it is."""
    if len(text) > MAX_URL:
        return f"at most {MAX_URL} characters"
    match = _PATTERN.fullmatch(text)
    if match is None:
        return ("must be http(s)://host[:port][/path], with * wildcards in the host, the port "
                "or the path (no credentials, no fragment)")
    port = match["port"]
    if port not in (None, "*") and not 1 <= int(port) <= 65535:
        return "the port must be 1-65535 or *"
    host = match["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "the IPv6 address is not valid"
    elif "*" not in host and host.replace(".", "").isdigit() and _ipv4(host) is None:
        return "an IPv4 address must be written as four decimal numbers, like 10.0.0.7"
    return None


def _pattern(text: str) -> Pattern:
    match = _PATTERN.fullmatch(text)
    assert match is not None, "validated with the config"
    host = match["host"].lower()
    ip: IPAddress | None = None
    if host.startswith("["):
        host = host[1:-1]
        ip = ipaddress.IPv6Address(host)
    elif "*" not in host:
        ip = _ipv4(host)
    host_re = re.escape(host).replace(r"\*", "[a-z0-9.-]*")
    port = match["port"]
    path = re.escape(match["path"] or "/").replace(r"\*", "[^/?]*")
    return Pattern(
        scheme=match["scheme"],
        host=re.compile(host_re if ip is None else re.escape(str(ip))),
        port=None if port == "*" else int(port) if port else DEFAULT_PORTS[match["scheme"]],
        path=re.compile(path),
        ip=ip,
    )


def secret_bytes(secret: str) -> bytes:
    """The key behind `whsec_<base64>` (empty when it is not that)."""
    if not secret.startswith("whsec_"):
        return b""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return b""


def parse(url: str) -> Target:
    """A callback URL, read strictly; raises `Refused`."""
    if len(url) > MAX_URL:
        raise Refused(f"X-Callback-URL must be at most {MAX_URL} characters.", code="bad_url")
    match = _URL.fullmatch(url)
    if match is None:
        raise Refused("X-Callback-URL must be an http:// or https:// URL with a host, an optional "
                      "port, path and query, and no credentials or fragment.", code="bad_url")
    scheme, host = match["scheme"], match["host"].lower()
    ip: IPAddress | None = None
    if host.startswith("["):
        host = host[1:-1]
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise Refused("X-Callback-URL has an invalid IPv6 address.", code="bad_url") from None
        host = str(ip)
    elif host.rpartition(".")[2].isdigit() or _NUMERIC.fullmatch(host):
        ip = _ipv4(host)  # a number (inet_aton reads 0x7f000001, 127.1): only dotted IPv4
        if ip is None:
            raise Refused("X-Callback-URL: an IPv4 host must be four decimal numbers.",
                          code="bad_url")
    if len(host) > 253:
        raise Refused("X-Callback-URL: the host name is too long.", code="bad_url")
    port = int(match["port"]) if match["port"] else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise Refused("X-Callback-URL: the port must be 1-65535.", code="bad_url")
    rest = match["rest"] if match["rest"].startswith("/") else "/" + match["rest"]
    target = Target("", scheme, host, port, ip, rest)
    return Target(target.origin + rest, scheme, host, port, ip, rest)


def from_request(rules: Rules | None, url: bytes | None, secret_id: bytes | None, *,
                 async_endpoint: bool) -> Callback | None:
    """The callback a request asks for (None: none), checked against the team's rules but for
    its addresses (`addresses`); raises `Refused`."""
    if url is None and secret_id is None:
        return None
    if url is None:
        raise Refused("X-Callback-Secret-Id needs an X-Callback-URL.", code="bad_url")
    if not async_endpoint:
        raise Refused("X-Callback-URL is for POSTs to the asynchronous endpoints (tasks).",
                      code="not_async")
    if rules is None:
        raise Refused("Task callbacks are not enabled for this team.", code="not_allowed")
    try:
        text = url.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("X-Callback-URL must be ASCII (percent-encode the rest).",
                      code="bad_url") from None
    target = parse(text)
    if not rules.allows(target):
        raise Refused("X-Callback-URL is not allowed for this team (callbacks.allow).",
                      code="not_allowed")
    sid = ""
    if secret_id is not None:
        sid = secret_id.decode("ascii", "replace")
        if not _SECRET_ID.fullmatch(sid) or sid not in rules.secret_ids:
            raise Refused("X-Callback-Secret-Id names no signing secret of this team.",
                          code="no_secret")
    return Callback(target, sid, rules.named(target))


async def addresses(target: Target, named: frozenset[IPAddress], *,
                    lookup: Lookup | None = None) -> list[IPAddress]:
    """The addresses to connect to, every one checked; raises `Refused` when the host does not
    resolve or any address is neither public nor in `named` (`Rules.named`)."""
    if target.ip is not None:
        found = [target.ip]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                texts = await (lookup or system_lookup)(target.host, target.port)
        except (OSError, TimeoutError):
            texts = []
        found = []
        for text in texts:
            try:
                found.append(ipaddress.ip_address(text.partition("%")[0]))
            except ValueError:
                continue
        if not found:
            raise Refused("X-Callback-URL: the host does not resolve.", code="unresolved")
    for address in found:
        if not public(address) and address not in named:
            raise Refused("X-Callback-URL leads to a private, loopback or link-local address "
                          "(allowed only as an IP literal that callbacks.allow names).",
                          code="private_address")
    return list(dict.fromkeys(found))


async def system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def public(address: IPAddress) -> bool:
    """An address anyone on the internet could reach (judging v4-in-v6 forms by their v4)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return public(address.ipv4_mapped)
        if address in _NAT64:
            return public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    return address if str(address) == text else None
