"""The upstream's HTTP/1.1 client (gateway/http1.py) against a server that answers with exactly
the bytes each test gives it: framing, reuse, limits and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import config as cfg
from gateway import http1
from gateway.upstream import Upstream

Answer = Callable[[bytes], Awaitable[bytes | None]]  # the request head -> the bytes to send back


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


class Scripted:
    """A server on a free port: each request's head goes to `answer`, whose bytes are written
    back (None: close the connection without a word); with `close_after`, the connection is
    closed after each answer, whatever the answer says."""

    def __init__(self, answer: Answer, *, close_after: bool = False,
                 tls: ssl.SSLContext | None = None, read_body: bool = True) -> None:
        self.answer = answer
        self.tls = tls
        self.read_body = read_body  # False: answer as soon as the head is in
        self.close_after = close_after
        self.closed = asyncio.Event()  # set when the server has closed a connection
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self._pools: list[http1.Pool] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pool in self._pools:
            await pool.close()
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def pool(self, tls: ssl.SSLContext | None = None, **options: float) -> http1.Pool:
        settings = {"limit": 4, "wait_s": 5.0, "connect_s": 5.0, "read_s": 5.0, **options}
        pool = http1.Pool("127.0.0.1", self.port, f"127.0.0.1:{self.port}", tls=tls,
                          limit=int(settings.pop("limit")), **settings)
        self._pools.append(pool)
        return pool

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if self.read_body:
                    await reader.readexactly(length)
                self.requests.append(head)
                out = await self.answer(head)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        self.closed.set()


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(h + b"\r\n" for h in extra), body)


async def fetch(pool: http1.Pool, method: str = "GET", path: str = "/x",
                body: bytes = b"") -> http1.Response:
    response = await pool.request(method, pool.head(method, path, [], body), body)
    await response.aread()
    return response


def run(answer: Answer, test: Callable[[Scripted], Awaitable[None]], *,
        close_after: bool = False) -> None:
    async def main() -> None:
        async with Scripted(answer, close_after=close_after) as server:
            await test(server)

    asyncio.run(main())


def fixed(out: bytes | None) -> Answer:
    async def answer(head: bytes) -> bytes | None:
        return out

    return answer


def test_kept_alive_and_framed_as_built() -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool()
        for n in range(3):
            response = await fetch(pool, "POST", f"/api/v1/chat?n={n}", b'{"a": 1}')
            assert (response.status_code, response.content) == (200, b"ok")
            assert pool.in_use == 0
        assert server.connections == 1
        lines = server.requests[0].split(b"\r\n")
        assert lines[0] == b"POST /api/v1/chat?n=0 HTTP/1.1"
        assert f"host: 127.0.0.1:{server.port}".encode() in lines
        assert b"content-length: 8" in lines
        get = await fetch(pool)  # no body: no length
        assert get.status_code == 200 and b"content-length" not in server.requests[-1]
        await pool.close()

    run(fixed(ok()), test)


def test_head_answer_ends_at_its_head() -> None:
    """A HEAD's answer says how long its GET would be; no body follows, and the connection is
    reused for the next request."""

    async def answer(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
        return ok(b"after")

    async def test(server: Scripted) -> None:
        pool = server.pool()
        peek = await fetch(pool, "HEAD")
        assert (peek.status_code, peek.content, peek.header(b"content-length")) == (200, b"", b"10")
        assert (await fetch(pool)).content == b"after"
        assert server.connections == 1 and pool.in_use == 0

    run(answer, test)


def test_body_ended_by_the_connection() -> None:
    """No length and not chunked: the body is what came before the server closed."""

    async def test(server: Scripted) -> None:
        pool = server.pool()
        assert (await fetch(pool)).content == b"until the end"
        assert (await fetch(pool)).content == b"until the end"  # on a new connection
        assert server.connections == 2 and pool.in_use == 0

    run(fixed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), test, close_after=True)


def test_connection_close_is_honoured() -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool()
        for _ in range(2):
            assert (await fetch(pool)).content == b"ok"
        assert server.connections == 2 and pool.in_use == 0

    run(fixed(ok(b"ok", b"connection: close")), test)


def test_interim_answers_are_skipped() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"

    async def test(server: Scripted) -> None:
        response = await fetch(server.pool())
        assert (response.status_code, response.content) == (200, b"ok")
        assert response.header(b"link") is None

    run(fixed(early + ok()), test)


def test_compressed_bodies_are_decoded() -> None:
    plain = b'{"answer": "' + b"x" * 5000 + b'"}'

    async def answer(head: bytes) -> bytes:
        if b"/deflate" in head:
            return ok(zlib.compress(plain), b"content-encoding: deflate")
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        return ok(packer.compress(plain) + packer.flush(), b"content-encoding: gzip")

    async def test(server: Scripted) -> None:
        pool = server.pool()
        assert (await fetch(pool, path="/gzip")).content == plain
        assert (await fetch(pool, path="/deflate")).content == plain
        response = await pool.request("GET", pool.head("GET", "/gzip", [], b""), b"")
        assert b"".join([chunk async for chunk in response.aiter_bytes()]) == plain

    run(answer, test)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70000 + b"\r\n\r\n",  # head too large
    b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",  # malformed
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",  # cut mid-body
], ids=["head-too-large", "malformed", "cut"])
def test_broken_answers(answer: bytes) -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool()
        with pytest.raises(http1.Broken) as raised:
            await fetch(pool)
        assert raised.value.kind == "broken" and not raised.value.unsent
        assert pool.in_use == 0

    run(fixed(answer), test, close_after=True)


def test_no_byte_for_the_read_timeout() -> None:
    async def silent(head: bytes) -> bytes | None:
        await asyncio.Event().wait()
        return None

    async def test(server: Scripted) -> None:
        pool = server.pool(read_s=0.2)
        with pytest.raises(http1.Broken) as raised:
            await fetch(pool)
        assert raised.value.kind == "timeout"
        assert pool.in_use == 0

    run(silent, test)


def test_the_pool_limit_queues_requests_and_bounds_the_wait() -> None:
    """Beyond `limit` a request waits for a connection (the first to wait gets the first one
    given back); past `wait_s` it fails unsent."""
    gate = asyncio.Event()

    async def gated(head: bytes) -> bytes:
        if b"/held" in head:
            await gate.wait()
        return ok(head.split(b" ")[1])

    async def test(server: Scripted) -> None:
        pool = server.pool(limit=1, wait_s=0.2)
        held = asyncio.create_task(fetch(pool, path="/held"))
        while pool.in_use == 0:
            await asyncio.sleep(0)
        with pytest.raises(http1.Broken) as raised:
            await fetch(pool, path="/late")
        assert raised.value.kind == "connect_timeout" and raised.value.unsent
        pool.wait_s = 5.0
        first = asyncio.create_task(fetch(pool, path="/first"))
        second = asyncio.create_task(fetch(pool, path="/second"))
        await asyncio.sleep(0)
        gate.set()
        assert (await held).content == b"/held"
        assert [(await first).content, (await second).content] == [b"/first", b"/second"]
        assert server.connections == 1 and pool.in_use == 0
        assert [r.split(b" ")[1] for r in server.requests] == [b"/held", b"/first", b"/second"]

    run(gated, test)


def test_a_connection_closed_while_idle_is_not_reused() -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool()
        assert (await fetch(pool)).content == b"ok"  # kept alive, as far as the answer says
        await server.closed.wait()
        for _ in range(100):  # the close reaches the client's loop within a few turns
            if not pool._idle:
                break
            await asyncio.sleep(0)
        assert not pool._idle
        assert (await fetch(pool)).content == b"ok"
        assert server.connections == 2 and pool.in_use == 0

    run(fixed(ok()), test, close_after=True)


def test_connections_idle_past_keepalive_are_not_reused() -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool(keepalive_s=0.0)
        await fetch(pool)
        await fetch(pool)
        assert server.connections == 2

    run(fixed(ok()), test)


def test_a_slow_reader_pauses_the_connection_and_gets_every_byte() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: past the high-water mark many times

    async def test(server: Scripted) -> None:
        pool = server.pool()
        response = await pool.request("GET", pool.head("GET", "/big", [], b""), b"")
        for _ in range(10000):  # nobody reads yet: the connection stops reading soon
            if response._paused:
                break
            await asyncio.sleep(0)
        assert response._paused
        got = bytearray()
        async for chunk in response.aiter_bytes():
            got += chunk
        assert bytes(got) == body
        assert pool.in_use == 0 and (await fetch(pool, path="/big")).content == body

    run(fixed(ok(body)), test)


def test_refused_is_unsent() -> None:
    async def test(server: Scripted) -> None:
        pool = server.pool()
        assert server.server is not None
        server.server.close()
        await server.server.wait_closed()
        with pytest.raises(http1.Broken) as raised:
            await fetch(pool)
        assert raised.value.kind == "connect" and raised.value.unsent
        assert pool.in_use == 0 and pool._open == 0

    run(fixed(ok()), test)


def test_tls_is_verified_and_kept_alive(tmp_path: Path) -> None:
    """Over TLS the certificate is checked against the pool's context (a server it does not
    trust is a connection never made), and `Upstream` reaches an https base URL with a port."""
    server_tls, trusting = self_signed(tmp_path)

    async def echo(head: bytes) -> bytes:
        return ok(orjson.dumps({"line": head.split(b"\r\n")[0].decode()}))

    async def main() -> None:
        async with Scripted(echo, tls=server_tls) as server:
            pool = server.pool(tls=trusting)
            for _ in range(2):
                assert (await fetch(pool, path="/secure")).status_code == 200
            assert server.connections == 1
            untrusting = server.pool(tls=ssl.create_default_context())
            with pytest.raises(http1.Broken) as raised:
                await fetch(untrusting)
            assert raised.value.kind == "connect" and untrusting.in_use == 0
            upstream = Upstream(cfg.Upstream(base_url=f"https://127.0.0.1:{server.port}/api/v1",
                                             api_key="aio_x", retries=0), verify=trusting)
            try:
                answer = await upstream.send("GET", "tasks/abc", b"n=1", [], b"")
                line = orjson.loads(answer.content)["line"]
                assert line == "GET /api/v1/tasks/abc?n=1 HTTP/1.1"
            finally:
                await upstream.aclose()

    asyncio.run(main())


def test_an_answer_nobody_asked_for_ends_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """Two answers to one request: the first is the request's, and the connection, out of step,
    is closed by the pool (not by the event loop's handler of a failed protocol) and not lent
    again."""

    async def test(server: Scripted) -> None:
        pool = server.pool()
        assert (await fetch(pool, path="/one")).content == b"first"
        for _ in range(100):  # the second answer reaches the client's loop within a few turns
            if not pool._idle:
                break
            await asyncio.sleep(0)
        assert not pool._idle and pool.in_use == 0
        assert (await fetch(pool, path="/two")).content == b"first"
        assert server.connections == 2

    with caplog.at_level("ERROR", logger="asyncio"):
        run(fixed(ok(b"first") + ok(b"second")), test)
    assert "Fatal error" not in caplog.text  # asyncio's words for a protocol that raised


def test_answered_before_the_body_was_sent_is_not_reused() -> None:
    """An upstream that answers before reading the whole body (an early error): what is left
    of the body would reach it as the next request, so the connection is closed."""

    async def test(server: Scripted) -> None:
        pool = server.pool()
        body = b"x" * (16 * 1024 * 1024)  # more than the sockets' buffers hold
        early = await fetch(pool, "POST", "/upload", body)
        assert (early.status_code, early.content) == (200, b"early")
        assert pool.in_use == 0 and not pool._idle
        assert (await fetch(pool, path="/next")).content == b"early"
        assert server.connections == 2

    async def main() -> None:
        async with Scripted(fixed(ok(b"early")), read_body=False) as server:
            await test(server)

    asyncio.run(main())
