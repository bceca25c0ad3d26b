"""The JSON log format: one object per line, the message and the structured fields together."""

from __future__ import annotations

import logging
import sys

import orjson

from gateway.logs import JsonFormatter, Redact


def line(message: str, *args: object, fields: dict[str, object] | None = None,
         error: bool = False) -> dict[str, object]:
    record = logging.LogRecord("gateway", logging.WARNING, __file__, 1, message, args,
                               sys.exc_info() if error else None)
    if fields is not None:
        record.fields = fields
    Redact(["aio_upstream_secret_123"]).filter(record)
    return orjson.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_a_line_with_fields_keeps_its_message() -> None:
    """Regression (issue 12, defect 9): the message was written only for records without
    fields, so "upstream stream broke off" was logged as a bare request id."""
    logged = line("upstream stream broke off", fields={"request_id": "abc"})
    assert logged["message"] == "upstream stream broke off"
    assert logged["request_id"] == "abc"
    assert logged["level"] == "warning" and logged["logger"] == "gateway"


def test_a_line_without_a_message_has_only_its_fields() -> None:
    logged = line("", fields={"request_id": "abc", "status": 200})  # the access log
    assert "message" not in logged
    assert (logged["request_id"], logged["status"]) == ("abc", 200)


def test_a_plain_line_has_its_formatted_message() -> None:
    assert line("store unreachable for %d s", 5)["message"] == "store unreachable for 5 s"


def test_fields_do_not_replace_what_the_line_is() -> None:
    logged = line("config reload refused", fields={"level": "debug", "message": "other"})
    assert (logged["level"], logged["message"]) == ("warning", "config reload refused")


def test_secrets_are_masked_in_the_message() -> None:
    logged = line("sent Bearer aiogw_team_key and aio_upstream_secret_123")
    assert logged["message"] == "sent Bearer [redacted] and [redacted]"


def test_the_traceback_is_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logged = line("unexpected error", fields={"request_id": "abc"}, error=True)
    assert logged["message"] == "unexpected error"
    assert "ValueError: boom" in str(logged["error"])
