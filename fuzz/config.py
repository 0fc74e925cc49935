"""Fuzz target: the configuration loader (:func:`dispatcher.config.load_config`).

Contract: whatever the file holds, loading it raises only
:class:`~dispatcher.core.upstream.ConfigError` (``zkgate serve`` turns that into a
message naming the key and exit code 2); a TOML syntax error, undecodable
bytes, a value of the wrong type and an unknown key included. Anything else
escaping is a crash.

Input layout: the first byte chooses the mode.

* even: the rest is the raw bytes of the file;
* odd: structured. A valid document (one of :data:`DOCUMENTS`, the README's
  scenarios among them) is mutated by the choices the rest of the input
  makes (replace a value with a palette value, delete or add a key, wrap a
  value in an array), then checked as a mapping (:func:`parse_config`) and
  as TOML text written back out (:func:`load_config`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import functools
import json
import math
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from dispatcher.config import ConfigError, load_config, parse_config
from fuzz._common import Cursor, fuzz_main

#: Valid configurations the structured mode starts from: scenarios 2, 3 and 4
#: of the README, and a document with every table the loader knows.
DOCUMENTS: tuple[str, ...] = (
    """
node_id = "gw-1"
[zookeeper]
listen = "127.0.0.1:2181"
data_dir = "/var/lib/zkgate"
[[upstream]]
name = "etcd"
kind = "etcd"
endpoint = "127.0.0.1:2379"
prefixes = [{ prefix = "/services/", layout = "grpc" }]
[[upstream]]
name = "consul"
kind = "consul"
address = "127.0.0.1:8500"
[[projection]]
root = "/dubbo"
layout = "dubbo"
[[projection]]
root = "/services"
layout = "curator"
""",
    """
node_id = "d1"
[subscriptions]
listen = "0.0.0.0:7000"
token = "change-me"
[membership]
kind = "zookeeper"
address = "zk1:2181,zk2:2181,zk3:2181"
root = "/zkgate"
[sharding]
id = "d1"
subscribe_address = "d1.internal:7000"
zookeeper_address = "d1.internal:2181"
[health]
enabled = true
interval = 5.0
probe = "tcp"
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "zk1:2181,zk2:2181,zk3:2181"
roots = [{ path = "/dubbo", layout = "dubbo" }]
""",
    """
[zookeeper]
listen = "0.0.0.0:2181"
max_client_cnxns = 0
[[mirror]]
root = "/dubbo"
hosts = "zk1:2181,zk2:2181,zk3:2181"
session_timeout = 10.0
auth = ["digest:zkgate:secret"]
max_sessions = 32
connect_timeout = 5.0
[[mirror]]
root = "/services"
hosts = "zk1:2181,zk2:2181,zk3:2181"
""",
    """
node_id = "gw-eu-1"
[zookeeper]
listen = "127.0.0.1:2181"
data_dir = "data"
tick_ms = 2000
max_buffer = 1048576
max_client_cnxns = 60
extended_types = false
container_check_ms = 60000
super_digest = "super:D/InIHSb7yEEbrWz8b9l71RjZJU="
[dispatcher]
interest = "all"
subscriber_queue = 1024
[admin]
enabled = true
listen = "127.0.0.1:8081"
max_connections = 64
[subscriptions]
listen = "127.0.0.1:7000"
unix = "subscribe.sock"
token = "a long random secret"
history = 256
max_connections = 1024
[[upstream]]
name = "files"
kind = "static"
path = "services.toml"
poll_interval = 1.0
[[upstream]]
name = "consul"
kind = "consul"
address = "127.0.0.1:8500"
scheme = "http"
token = "t"
services = ["orders"]
wait = 10.0
min_interval = 0.1
[[upstream]]
name = "etcd"
kind = "etcd"
endpoint = "127.0.0.1:2379"
prefixes = [{ prefix = "/services/", layout = "json" }]
timeout = 5.0
max_backoff = 10.0
[[upstream]]
name = "zk"
kind = "zookeeper"
hosts = "127.0.0.1:2181"
roots = [{ path = "/services", layout = "curator" }]
session_timeout = 10.0
auth = ["digest:u:p"]
[[projection]]
root = "/dubbo"
layout = "dubbo"
hide_failing = false
[health]
enabled = true
interval = 5.0
timeout = 1.0
rise = 2
fall = 3
jitter = 0.1
concurrency = 256
recheck = 0.5
probe = "http"
path = "/health"
[[health.service]]
name = "orders"
probe = "http"
path = "/healthz"
""",
)

#: Values the structured mode puts in place of others: every TOML type, the
#: edges of the numbers, and strings that parsers of addresses, paths and
#: credentials find awkward.
PALETTE: tuple[Any, ...] = (
    0, 1, -1, 2, 2**31, 2**63 - 1, -(2**63), 10**30, 0.0, -0.0, 0.5, 1e-300, 1e300,
    math.inf, -math.inf, math.nan, True, False,
    "", " ", "x", "0", "1.5", "all", "subscribed", "tcp", "http", "none", "/", "/a", "..", ".",
    "/zookeeper", "/dubbo/x", "127.0.0.1:0", "127.0.0.1:65536", ":", ":80", "[::1]:2181",
    "[::1", "host:-1", "a:1,b:2", "a:1,,b", "digest:u:p", "digest:", "ip:10.0.0.0/8",
    "super:abc", "~", "~nosuchuser/zkgate", "\x00", "\u00e9\U0001f600", "9" * 5000,
    datetime.datetime(2024, 1, 1, 0, 0), datetime.date(2024, 1, 1), datetime.time(12, 0),
    [], [1], [""], ["a", "a"], [{}], [[1]], {}, {"a": 1}, {"name": "x"},
)  # fmt: skip

#: Keys the structured mode adds: every key the loader knows, and one it does not.
KEYS: tuple[str, ...] = (
    "node_id", "zookeeper", "dispatcher", "upstream", "projection", "mirror", "health",
    "admin", "subscriptions", "membership", "sharding", "listen", "data_dir", "tick_ms",
    "max_buffer", "max_client_cnxns", "extended_types", "container_check_ms", "super_digest",
    "interest", "subscriber_queue", "enabled", "max_connections", "unix", "token", "history",
    "name", "kind", "root", "layout", "hide_failing", "hosts", "session_timeout", "auth",
    "max_sessions", "max_cached", "connect_timeout", "idle_timeout", "interval", "timeout",
    "rise", "fall", "jitter", "concurrency", "recheck", "probe", "path", "service", "address",
    "id", "weight", "balance", "subscribe_address", "zookeeper_address", "services",
    "warm_timeout", "roots", "prefixes", "endpoint", "poll_interval", "unknown_key",
)  # fmt: skip


@functools.cache
def _documents() -> tuple[dict[str, Any], ...]:
    return tuple(tomllib.loads(text) for text in DOCUMENTS)


@functools.cache
def _scratch() -> Path:
    """The file each input is written to: one per fuzzing process, in the temp dir,
    removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="zkgate-fuzz-config-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder) / "zkgate.toml"


def _containers(value: Any) -> list[dict[str, Any] | list[Any]]:
    """Every table and array in ``value``, itself included, outermost first."""
    found: list[dict[str, Any] | list[Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def mutate(document: dict[str, Any], cursor: Cursor) -> None:
    """Apply the mutations the cursor chooses to ``document``, in place."""
    for _ in range(cursor.byte() % 8 + 1):
        containers = _containers(document)
        target = containers[cursor.pick(len(containers))]
        value = copy.deepcopy(PALETTE[cursor.pick(len(PALETTE))])
        action = cursor.byte() % 4
        if isinstance(target, dict):
            keys = list(target)
            if action == 0 or not keys:
                target[KEYS[cursor.pick(len(KEYS))]] = value
            elif action == 1:
                del target[keys[cursor.pick(len(keys))]]
            elif action == 2:
                key = keys[cursor.pick(len(keys))]
                target[key] = [target[key]]
            else:
                target[keys[cursor.pick(len(keys))]] = value
        elif action == 0 or not target:
            target.append(value)
        elif action == 1:
            del target[cursor.pick(len(target))]
        else:
            target[cursor.pick(len(target))] = value


def to_toml(document: dict[str, Any]) -> str:
    """``document`` as TOML: one ``key = value`` line per top-level key, nested
    tables and arrays of tables written inline (the loader cannot tell)."""
    return "".join(f"{_key(key)} = {_value(value)}\n" for key, value in document.items())


def _key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"


def load(text: bytes) -> None:
    path = _scratch()
    path.write_bytes(text)
    with contextlib.suppress(ConfigError):
        load_config(path)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    if mode % 2 == 0:
        load(payload)
        return
    cursor = Cursor(payload)
    documents = _documents()
    document = copy.deepcopy(documents[(mode >> 1) % len(documents)])
    mutate(document, cursor)
    with contextlib.suppress(ConfigError):
        parse_config(document, base_dir=_scratch().parent)
    load(to_toml(document).encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    fuzz_main(TestOneInput, "dispatcher", "adapters", "metaserver", "tomllib", "fuzz")
