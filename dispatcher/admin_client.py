"""The client side of a node's admin endpoint, for the commands that talk to a running
zkgate (``zkgate status``, ``inspect``, ``policy``, ``mesh``): one request, its JSON
answer, and the two ways it fails."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["Refused", "Unreachable", "call"]


class Refused(Exception):
    """The endpoint answered with an HTTP error; the message is its status and what it
    said (its JSON ``error``, if any)."""


class Unreachable(Exception):
    """The endpoint could not be reached, or did not answer with JSON."""


def call(
    admin: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float,
) -> Any:
    """``method path`` on the admin endpoint at ``admin`` (``HOST:PORT``; HTTPS with
    ``context``); its JSON answer, or :class:`Refused`, or :class:`Unreachable`."""
    scheme = "http" if context is None else "https"
    request = urllib.request.Request(
        f"{scheme}://{admin}{path}", data=body, headers=dict(headers or {}), method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raise Refused(f"HTTP {exc.code}: {_message(exc.read())}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise Unreachable(str(getattr(exc, "reason", exc))) from None
    except ValueError as exc:
        raise Unreachable(f"not an admin API answer: {exc}") from None


def _message(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"]
    return body.decode(errors="replace").strip()
