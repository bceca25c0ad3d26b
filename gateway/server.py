"""Running the gateway under uvicorn.

`HttpProtocol`: requests the HTTP parser cannot read (an unknown method token, CR/LF in a header)
never reach the ASGI app; uvicorn answers them itself in plain text, and with httptools it
accepts a URL and headers of any size. This subclass keeps uvicorn's behaviour, caps the head at
`MAX_HEAD_BYTES` (as nginx's large_client_header_buffers does) and answers in the error shape.

`Server`: on SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the grace
period) and runs the app's shutdown, which settles their charges; it then raises the signal
again, so the process would end with status 143. A gateway that finished its work exits 0.
"""

from __future__ import annotations

import os
from types import FrameType

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from .errors import error_body

APP = "gateway.app:create_app_from_env"

MAX_HEAD_BYTES = 32 * 1024


class HttpProtocol(HttpToolsProtocol):
    _head_bytes = 0
    _head_too_large = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise httptools.HttpParserError("request head too large")

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            status, reason = 431, b"Request Header Fields Too Large"
            message = f"The request's URL and headers exceed {MAX_HEAD_BYTES} bytes."
        else:
            status, reason = 400, b"Bad Request"
            message = "The request is not valid HTTP (method, URL or headers)."
        body = error_body(status, message, "invalid_request")
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"x-request-id: ", os.urandom(16).hex().encode(), b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


class Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(*, host: str, port: int, workers: int, grace_s: float) -> int:
    """Serve until SIGTERM or SIGINT; the exit status is 0 after a graceful shutdown."""
    config = uvicorn.Config(
        APP, factory=True, host=host, port=port, workers=workers, loop="uvloop",
        http=HttpProtocol, log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=int(grace_s),
    )
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = Server(config)
    server.run()
    return 0 if server.started else 3
