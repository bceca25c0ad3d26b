"""Errors the gateway answers with, in the upstream's error shape.

    GatewayError                  {"error": {"code", "message", "type"}}
    ├── InvalidRequest            400 invalid_request (bad JSON, missing model, bad header)
    │   ├── IdempotencyConflict   409 invalid_request (same Idempotency-Key still in flight)
    │   ├── IdempotencyMismatch   422 invalid_request (same Idempotency-Key, other body)
    │   └── RequestTimeout        408 invalid_request (the body stalled; the connection closes)
    ├── MethodNotAllowed          405 invalid_request
    ├── AuthenticationError       401 authentication_error
    ├── InsufficientCredits       402 insufficient_credits (team budget spent)
    ├── PermissionDenied          403 permission_denied (model not allowed, not an admin key)
    ├── NotFound                  404 not_found (unknown route, or another team's task)
    ├── RequestTooLarge           413 request_too_large
    ├── RateLimited               429 rate_limit (team quota, or the upstream allowance)
    ├── UpstreamUnavailable       502 / 503 / 504 upstream_unavailable
    ├── StoreUnavailable          503 store_unavailable
    └── ClientDisconnected        499 (the client went away: counted, never sent)

Messages are written for the team's developers and never carry secrets or internal detail.
"""

from __future__ import annotations

import math

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    reason: str | None = None  # `gateway_rejections_total` label when the gateway refused

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if status is not None:
            self.status = status

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.type)


def error_body(status: int, message: str, type_: str) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message, "type": type_}})


def retry_after(seconds: float) -> str:
    """`Retry-After` in whole seconds, never zero (a zero invites a hot retry loop)."""
    return str(max(1, math.ceil(seconds)))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request"
    reason = "invalid"


class IdempotencyConflict(InvalidRequest):
    status = 409
    reason = "idempotency"


class IdempotencyMismatch(InvalidRequest):
    status = 422
    reason = "idempotency"


class RequestTimeout(InvalidRequest):
    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class MethodNotAllowed(InvalidRequest):
    status = 405


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    reason = "auth"


class InsufficientCredits(GatewayError):
    status = 402
    type = "insufficient_credits"
    reason = "budget"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"
    reason = "model"


class NotFound(GatewayError):
    status = 404
    type = "not_found"
    reason = "not_found"


class RequestTooLarge(GatewayError):
    status = 413
    type = "request_too_large"
    reason = "too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit"
    reason = "quota"

    def __init__(self, message: str, *, wait_s: float,
                 headers: dict[str, str] | None = None) -> None:
        headers = {**(headers or {}), "Retry-After": retry_after(wait_s),
                   "Cache-Control": "no-store"}
        super().__init__(message, headers=headers)


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_unavailable"


class StoreUnavailable(GatewayError):
    status = 503
    type = "store_unavailable"
    reason = "store"

    def __init__(self, message: str = "The gateway's store is unreachable; retry shortly.") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ClientDisconnected(GatewayError):
    """The client went away before its request was read: nginx's 499, for metrics and logs.

    A `GatewayError` rather than a bare exception, so that every handler that answers errors
    counts it as what it is (there is nobody left to send the answer to)."""

    status = 499
    type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before its request was read.")
