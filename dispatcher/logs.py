"""Structured logs: one line per event, in logfmt, with the fields the event concerns.

``zkgate --log-format logfmt`` (the default) writes lines such as::

    ts=2024-05-01T12:00:00.123Z level=info logger=dispatcher.zk.server.engine msg="session opened" \
        session=0x100000001 peer=/127.0.0.1:53412

(one line; broken here for the page).

Fields an event concerns are passed by the call site with ``extra=``::

    log.info("session opened", extra={"session": session.id, "peer": peer.remote})

Every key of ``extra`` becomes a ``key=value`` field after ``msg``; the
common ones come first in a fixed order (:data:`FIELD_ORDER`) so that lines
about the same session, path or service line up, and ``session`` given as an
int is written in hex, as ZooKeeper writes session ids (so is any
``*_session`` field, such as the mirror's ``upstream_session``). Values are quoted
when they contain spaces, quotes, ``=`` or control characters, and newlines
are escaped, so one event is always exactly one line, tracebacks included
(``exc="Traceback ...\\n..."``). Any line splits with a logfmt parser (or
``shlex``-like rules) back into its fields.

``--log-format plain`` keeps the human layout
(``2024-05-01 12:00:00,123 INFO logger message``) and appends the same
fields, so switching formats loses nothing.

Levels, as zkgate uses them: ``debug`` for per-request and per-version
detail (off by default), ``info`` for lifecycle events an operator may want
in an audit trail (a session opened or expired, an upstream connected, a
port bound), ``warning`` for something wrong outside the process that it
rides out (an upstream down, a client closed for bad bytes, a refused
connection), ``error`` for a component that failed and was restarted or a
request the process could not serve.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Final, Literal, TextIO

__all__ = [
    "FIELD_ORDER",
    "LOG_FORMATS",
    "LogfmtFormatter",
    "PlainFormatter",
    "RepeatLimiter",
    "configure_logging",
    "event_fields",
]

LogFormat = Literal["logfmt", "plain"]
LOG_FORMATS: Final = ("logfmt", "plain")

FIELD_ORDER: Final = ("session", "path", "service", "upstream", "peer", "instance")
"""Fields written first, in this order, when present; the rest follow as given."""

# Every attribute a LogRecord has without extra=, so that what is left is the
# caller's. Computed from a real record: new Python versions add attributes
# (taskName in 3.12) and must not show up as fields.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\]|[^\x21-\x7e]')
_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE: Final = re.compile(r'["\\\n\r\t]|[\x00-\x1f\x7f]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _ESCAPE.sub(_escape, text) + '"'


def _field_text(key: str, value: object) -> str:
    if (key == "session" or key.endswith("_session")) and type(value) is int:
        return f"0x{value:x}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return _value(value)


def event_fields(record: logging.LogRecord) -> list[tuple[str, object]]:
    """The ``extra=`` fields of ``record``: :data:`FIELD_ORDER` first, then the rest."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    ordered = [(key, extra.pop(key)) for key in FIELD_ORDER if key in extra]
    return ordered + list(extra.items())


def _timestamp(created: float) -> str:
    # Whole milliseconds first: created - int(created) would turn .123 into .122.
    seconds, millis = divmod(round(created * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." key=value ...``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record.created)}",
            f"level={record.levelname.lower()}",
            f"logger={_value(record.name)}",
            f"msg={_value(record.getMessage())}",
        ]
        parts += [f"{key}={_field_text(key, value)}" for key, value in event_fields(record)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(f"exc={_value(record.exc_text)}")
        if record.stack_info:
            parts.append(f"stack={_value(record.stack_info)}")
        return " ".join(parts)


class PlainFormatter(logging.Formatter):
    """The human layout, with the ``extra=`` fields appended and newlines kept.

    Plain logs are for a terminal: a traceback stays readable over several
    lines here, unlike in logfmt.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = event_fields(record)
        if fields:
            text += "  " + " ".join(f"{k}={_field_text(k, v)}" for k, v in fields)
        return text


class RepeatLimiter(logging.Filter):
    """Lets the same warning or error through at most once per ``interval``.

    "The same" is the same logger and the same message template (zkgate's
    messages are constant; the particulars are fields), so a peer that makes
    one listener warn in a loop costs one line a second, not one per attempt.
    The next line let through carries ``suppressed=N``, the repeats dropped
    since the last one. Lines below WARNING are never held back: they are
    off by default, and info lines are an audit trail.
    """

    def __init__(
        self,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        # (logger, template) -> (when last let through, repeats dropped since)
        self._seen: OrderedDict[tuple[str, object], tuple[float, int]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.suppressed = last[1]
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)  # the least recently let through
        return True


def configure_logging(
    level: str | int = "INFO",
    log_format: LogFormat = "logfmt",
    stream: TextIO | None = None,
    fields: Mapping[str, object] | None = None,
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) in ``log_format``.

    Replaces the handler an earlier call installed (other handlers, such as
    a test runner's, stay) and returns the new one. Repeated warnings and
    errors are limited to one a second each (:class:`RepeatLimiter`).
    ``fields`` are added to every record, e.g. the node id when several
    gateways log to one place.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter() if log_format == "logfmt" else PlainFormatter())
    handler.addFilter(RepeatLimiter())
    if fields:
        constant = dict(fields)

        def add_fields(record: logging.LogRecord) -> bool:
            for key, value in constant.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
            return True

        handler.addFilter(add_fields)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if getattr(old, "_zkgate", False):
            root.removeHandler(old)
    handler._zkgate = True  # type: ignore[attr-defined]  # our marker; Handler declares no such field
    root.addHandler(handler)
    root.setLevel(level)
    return handler
