"""API-key check for ``moelab serve --api-key`` (or ``MOELAB_API_KEY``).

A plain ASGI middleware rather than a FastAPI dependency: it answers before the body is read and
before any route is matched, so an unauthenticated client can neither hold the server reading a
body nor learn which paths exist. ``GET /health`` stays open for load balancers' probes.
"""

from __future__ import annotations

import hmac
from typing import Any

from moelab.config import ConfigError
from moelab.infer.openai_schema import error_body

OPEN_PATHS = frozenset({"/health"})


def check_api_key(api_key: str) -> str:
    """``api_key`` after one clear error for an empty or non-ASCII key (a header cannot carry it)."""
    if not isinstance(api_key, str) or not api_key.strip() or not api_key.isascii() or api_key != api_key.strip():
        raise ConfigError(
            "--api-key / MOELAB_API_KEY is invalid: must be a non-empty ASCII string without surrounding spaces"
        )
    return api_key


class RequireAPIKey:
    """401 in OpenAI's shape for any HTTP request without ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = b"Bearer " + check_api_key(api_key).encode()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return hmac.compare_digest(b"Bearer " + token.strip(), self.expected) and scheme.lower() == b"bearer"
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        message = "missing or incorrect API key: send it as 'Authorization: Bearer <key>'"
        await JSONResponse(error_body(401, message), 401)(scope, receive, send)


__all__ = ["OPEN_PATHS", "RequireAPIKey", "check_api_key"]
