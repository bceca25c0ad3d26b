"""The OpenAPI document of the gateway's own surface, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

from . import __version__


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "aio-gateway", "version": __version__},
        "paths": {},
    }
