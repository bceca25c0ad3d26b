"""The upstream's endpoints, and the bounded `route` label derived from a path."""

from __future__ import annotations

import re

CHAT = "chat/completions"
TASKS = "tasks"
ASYNC_ENDPOINTS = frozenset({
    "images/generations",
    "videos/generations",
    "audio/music",
    "audio/speech",
    "images/tools/remove-bg",
})
ENDPOINTS = frozenset({CHAT, *ASYNC_ENDPOINTS})
ROUTES = (*sorted(ENDPOINTS), TASKS, "other")

_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*"  # a segment never starts with a dot
_SAFE_PATH = re.compile(f"{_SEGMENT}(?:/{_SEGMENT})*")
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def route_of(path: str) -> str:
    """`path` is below /api/v1/, without the leading slash; ids never become labels."""
    if path in ENDPOINTS:
        return path
    if path.startswith("tasks/"):
        return TASKS
    return "other"


def is_safe_path(path: str) -> bool:
    """Plain segments only: no empty, dot or dot-dot segments, no encoded tricks."""
    return _SAFE_PATH.fullmatch(path) is not None


def task_id_of(path: str) -> str | None:
    """The id of `tasks/{id}`, or None when the path is not one task or the id is malformed."""
    prefix, _, task_id = path.partition("/")
    if prefix != TASKS or not _TASK_ID.fullmatch(task_id):
        return None
    return task_id
