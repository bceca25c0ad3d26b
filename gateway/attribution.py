"""Cost-attribution tags: `X-Gateway-Tags: project=search,env=prod` -> the tags the config allows.

Only keys listed in `attribution.tags` are kept, each with a value from its list or matching its
pattern (fullmatch, on at most 64 characters that start with a letter or digit), and at most
`attribution.max_tags` of them. The rest are ignored and named, with the reason, in the answer's
`X-Gateway-Tags-Ignored` header. Tags are ledger fields only, never metric labels.
"""

from __future__ import annotations

import re
from collections import Counter

from . import config as cfg

TAGS_HEADER = b"x-gateway-tags"
IGNORED_HEADER = b"x-gateway-tags-ignored"
MAX_HEADER = 1024
MAX_REPORTED = 8
_SHOWN = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # an ignored key is echoed only if it is this plain


class TagRules:
    """The tag keys of one config and the values each accepts."""

    def __init__(self, config: cfg.Attribution) -> None:
        self.max_tags = config.max_tags
        self._values = {k: frozenset(r.values) for k, r in config.tags.items() if r.values}
        self._patterns = {k: re.compile(r.pattern) for k, r in config.tags.items() if r.pattern}

    def knows(self, key: str) -> bool:
        return key in self._values or key in self._patterns

    def accepts(self, key: str, value: str) -> bool:
        if not cfg.TAG_VALUE.fullmatch(value):
            return False
        values = self._values.get(key)
        if values is not None:
            return value in values
        return self._patterns[key].fullmatch(value) is not None


def parse_tags(header: bytes | None, rules: TagRules) -> tuple[dict[str, str], str | None]:
    """The tags to keep, and the `X-Gateway-Tags-Ignored` value (None when nothing was)."""
    if not header:
        return {}, None
    if len(header) > MAX_HEADER:
        return {}, f"all (the header is longer than {MAX_HEADER} bytes)"
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return {}, "all (the header is not ASCII)"
    pairs = []
    ignored: list[str] = []
    for item in filter(None, (part.strip(" \t") for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(" \t"), value.strip(" \t")
        if sep and key:
            pairs.append((key, value))
        else:
            ignored.append(f"{_shown(key)} (malformed)")
    seen = Counter(key for key, _ in pairs)
    duplicates: set[str] = set()
    kept: dict[str, str] = {}
    for key, value in pairs:
        if seen[key] > 1:  # which value to bill is ambiguous: neither is kept
            if key in duplicates:
                continue
            duplicates.add(key)
            reason = "duplicate"
        elif not rules.knows(key):
            reason = "unknown key"
        elif not rules.accepts(key, value):
            reason = "bad value"
        elif len(kept) >= rules.max_tags:
            reason = "too many"
        else:
            kept[key] = value
            continue
        ignored.append(f"{_shown(key)} ({reason})")
    if not ignored:
        return kept, None
    more = len(ignored) - MAX_REPORTED
    return kept, ", ".join(ignored[:MAX_REPORTED]) + (f", and {more} more" if more > 0 else "")


def _shown(key: str) -> str:
    return key if _SHOWN.fullmatch(key) else "?"
