"""Structured logs: one logfmt line per event, with the fields the call site passed."""

from __future__ import annotations

import io
import logging
import re
import shlex

import pytest

from dispatcher.logs import LogfmtFormatter, PlainFormatter, configure_logging


def record(
    message: str,
    *args: object,
    level: int = logging.INFO,
    exc: bool = False,
    **extra: object,
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    made = logging.getLogger("dispatcher.zk.server.engine").makeRecord(
        "dispatcher.zk.server.engine", level, "engine.py", 1, message, args, exc_info, extra=extra
    )
    made.created = 1714564800.123  # 2024-05-01T12:00:00.123Z
    return made


def fields(line: str) -> dict[str, str]:
    """Split a logfmt line the way a log pipeline would."""
    return dict(token.split("=", 1) for token in shlex.split(line))


def test_a_logfmt_line_has_time_level_logger_message_and_fields_in_order() -> None:
    line = LogfmtFormatter().format(
        record("session %s opened", "x", service="orders", peer="/127.0.0.1:5", session=0x1F,
               path="/a b", custom=3)
    )  # fmt: skip
    assert line == (
        "ts=2024-05-01T12:00:00.123Z level=info logger=dispatcher.zk.server.engine "
        'msg="session x opened" session=0x1f path="/a b" service=orders peer=/127.0.0.1:5 '
        "custom=3"
    )
    assert fields(line)["path"] == "/a b"


def test_every_event_is_one_line_tracebacks_and_newlines_included() -> None:
    line = LogfmtFormatter().format(
        record('bad "frame"\nfrom %s', "peer", level=logging.WARNING, exc=True, session=7)
    )
    assert "\n" not in line
    parsed = fields(line)
    assert parsed["level"] == "warning"
    assert parsed["msg"] == 'bad "frame"\\nfrom peer'  # escaped, not broken
    assert parsed["session"] == "0x7"
    assert parsed["exc"].startswith("Traceback (most recent call last):\\n")
    assert "ValueError: boom\\nsecond line" in parsed["exc"]


def test_values_are_quoted_only_when_they_must_be() -> None:
    line = LogfmtFormatter().format(
        record("m", empty="", equals="a=b", flag=True, nothing=None, tab="a\tb")
    )
    assert 'empty="" equals="a=b" flag=true nothing= tab="a\\tb"' in line


def test_plain_format_keeps_the_human_layout_and_appends_the_fields() -> None:
    formatter = PlainFormatter()
    line = formatter.format(record("session opened", session=0x10, service="orders"))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO dispatcher\.zk\.server\.engine session opened"
        r"  session=0x10 service=orders",
        line,
    )
    assert formatter.format(record("no fields")).endswith("dispatcher.zk.server.engine no fields")


def test_configure_logging_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("INFO", "logfmt", stream=first)
        handler = configure_logging("DEBUG", "logfmt", stream=second, fields={"node": "gw-1"})
        assert [h for h in root.handlers if h not in before] == [handler]
        logging.getLogger("dispatcher.core.fanin").debug("applied", extra={"service": "orders"})
        assert first.getvalue() == ""
        assert second.getvalue().endswith(
            "logger=dispatcher.core.fanin msg=applied service=orders node=gw-1\n"
        )
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "json")  # type: ignore[arg-type]  # the point: not a LogFormat
