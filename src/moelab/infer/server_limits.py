"""What one server accepts (:class:`ServerLimits`), and the check on a request body that must
run before it is parsed (:func:`json_too_deep`).

Why a depth check before ``json.loads``: the parser and every validator after it recurse once per
level of nesting, so a 1 MB body of ``[[[[…`` ends in a ``RecursionError`` (a 500) or worse; no
real OpenAI request nests deeper than a handful of levels. The scan is linear in the body and
runs in C except for one loop over the brackets left outside strings.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from itertools import accumulate

from moelab.config import ConfigError

MAX_JSON_DEPTH_CAP = 200  # well under Python's recursion limit of 1000, whatever the caller's stack


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts. Every field is a ``moelab serve`` flag (see docs/inference.md)."""

    max_body_bytes: int = 1_000_000  # larger bodies get 413
    max_json_depth: int = 32  # deeper nesting of arrays/objects gets 400, before parsing
    body_timeout_s: float = 10.0  # a body not fully received in this time gets 408 and the connection closed
    max_pending: int = 64  # requests admitted (queued or running) at once; more get 429
    max_batch: int = 8  # rows per generate() call
    batch_wait_s: float = 0.005  # how long the worker waits to fill a batch
    timeout_s: float = 120.0  # per request, from admission to the last token
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_stop: int = 4

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_pending", "max_batch", "default_max_tokens", "max_stop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"server.{name}={value!r} is invalid: must be an integer >= 1")
        if self.max_json_depth > MAX_JSON_DEPTH_CAP:
            raise ConfigError(
                f"server.max_json_depth={self.max_json_depth!r} is invalid: must be <= {MAX_JSON_DEPTH_CAP} "
                "(deeper JSON risks a recursion error while parsing)"
            )
        for name in ("batch_wait_s", "timeout_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"server.{name}={value!r} is invalid: must be >= 0")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"server.body_timeout_s={self.body_timeout_s!r} is invalid: must be > 0")


_ESCAPE = re.compile(rb"\\.", re.S)  # a backslash and the byte it escapes
_STRING = re.compile(rb'"[^"]*"')  # a string literal once escapes are gone
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 to open, -1 (as a signed byte) to close


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether ``body`` nests arrays/objects more than ``max_depth`` levels deep.

    Brackets inside string literals do not count. Every step is linear in the body (escapes are
    dropped first so no string pattern can backtrack). On a body that is not valid JSON the
    answer may be either; the parser reports such a body anyway.
    """
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", body)).translate(None, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return False
    return max(accumulate(array("b", brackets.translate(_STEP)))) > max_depth


__all__ = ["MAX_JSON_DEPTH_CAP", "ServerLimits", "json_too_deep"]
