"""Answers to ZooKeeper's four-letter words, in ZooKeeper 3.8's formats.

Monitoring tools parse these texts (``mntr`` keys, ``srvr`` lines), so their
shape follows ZooKeeper's byte for byte where tools read it.

Which words are answered is a :class:`FourLetterWhitelist`, ZooKeeper's
``4lw.commands.whitelist``: a refused word gets ZooKeeper's refusal text and
the connection closes, as after any answer.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import attrs

from dispatcher.zk.codec.connection import FOUR_LETTER_WORDS
from dispatcher.zk.codec.protocol import SERVER_VERSION, OpCode
from dispatcher.zk.server.engine import Client, Engine

log = logging.getLogger(__name__)

#: The key of :func:`answer`'s ``settings`` that holds the whitelist
#: (ZooKeeper's name for it); ``conf`` does not print it, as ZooKeeper's does not.
WHITELIST_SETTING: Final = "4lw.commands.whitelist"

#: Always enabled, whatever the list says: ZooKeeper adds it itself because
#: ``zkServer.sh status`` depends on it (``FourLetterCommands.isEnabled``).
_ALWAYS: Final = frozenset({"srvr"})


@attrs.frozen
class FourLetterWhitelist:
    """The four-letter words a server answers; every other word is refused.

    ``words`` always holds ``srvr``, as in ZooKeeper. Build one with
    :meth:`parse` (ZooKeeper's comma string) or :meth:`of`, which check the words.
    """

    words: frozenset[str] = attrs.field(converter=lambda words: frozenset(words) | _ALWAYS)

    @classmethod
    def of(cls, words: Iterable[str]) -> FourLetterWhitelist:
        """The whitelist of ``words``; ``*`` among them means every word.

        Raises ValueError naming a word ZooKeeper 3.8 does not know: ZooKeeper
        ignores such an entry, but a misspelt word silently refused is exactly
        the mistake a whitelist must not hide.
        """
        chosen = set(words)
        unknown = sorted(chosen - FOUR_LETTER_WORDS - {"*"})
        if unknown:
            raise ValueError(
                f"unknown four-letter word{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} (known: {', '.join(sorted(FOUR_LETTER_WORDS))}, "
                "or * for all)"
            )
        return cls(FOUR_LETTER_WORDS if "*" in chosen else chosen)

    @classmethod
    def parse(cls, text: str) -> FourLetterWhitelist:
        """ZooKeeper's syntax: words separated by commas, each trimmed of
        whitespace, empty entries skipped, ``*`` for every word, case sensitive."""
        return cls.of(entry.strip() for entry in text.split(",") if entry.strip())

    def allows(self, word: str) -> bool:
        return word in self.words

    def __str__(self) -> str:
        """The comma string :meth:`parse` reads back into an equal whitelist."""
        if self.words == FOUR_LETTER_WORDS:
            return "*"
        return ",".join(sorted(self.words))


#: zkgate's default: the words that disclose nothing about clients, sessions,
#: paths or the host, and change nothing. ZooKeeper 3.8's own default is
#: ``srvr`` alone; zkgate adds the liveness and metrics words monitoring uses.
DEFAULT_WHITELIST: Final = FourLetterWhitelist.parse("ruok, srvr, mntr, isro")


def refusal(word: str) -> str:
    """ZooKeeper's answer to a word it will not run (``NopCommand``'s ``println``)."""
    return f"{word} is not executed because it is not in the whitelist.\n"


def _latency(engine: Engine) -> str:
    s = engine.stats
    return f"Latency min/avg/max: {s.min_latency:.0f}/{s.avg_latency:.4f}/{s.max_latency:.0f}\n"


def _summary(engine: Engine) -> str:
    s = engine.stats
    return (
        _latency(engine)
        + f"Received: {s.packets_received}\n"
        + f"Sent: {s.packets_sent}\n"
        + f"Connections: {len(engine.clients)}\n"
        + "Outstanding: 0\n"
        + f"Zxid: 0x{engine.zxid:x}\n"
        + "Mode: standalone\n"
        + f"Node count: {len(engine.tree.nodes)}\n"
    )


def srvr(engine: Engine) -> str:
    return f"Zookeeper version: {SERVER_VERSION}\n" + _summary(engine)


def _client_line(client: Client, detailed: bool) -> str:
    base = f" {client.peer.remote}[1](queued=0,recved={client.received},sent={client.sent}"
    if not detailed:
        return base + ")\n"
    return (
        base
        + f",sid=0x{client.session.id:x},lop={_op_name(client.last_op)}"
        + f",est={int(client.connected_at)}"
        + f",to={client.session.timeout_ms},lzxid=0x{client.last_zxid:x})\n"
    )


def _op_name(opcode: int | None) -> str:
    if opcode is None:
        return "NA"
    try:
        return OpCode(opcode).name
    except ValueError:
        return str(opcode)


def stat(engine: Engine) -> str:
    clients = "".join(_client_line(c, detailed=False) for c in engine.clients)
    return f"Zookeeper version: {SERVER_VERSION}\nClients:\n{clients}\n" + _summary(engine)


def cons(engine: Engine) -> str:
    return "".join(_client_line(c, detailed=True) for c in engine.clients) + "\n"


def mntr(engine: Engine) -> str:
    s = engine.stats
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = -1
    values: list[tuple[str, object]] = [
        ("zk_version", SERVER_VERSION),
        ("zk_server_state", "standalone"),
        ("zk_avg_latency", f"{s.avg_latency:.4f}"),
        ("zk_max_latency", f"{s.max_latency:.0f}"),
        ("zk_min_latency", f"{s.min_latency:.0f}"),
        ("zk_packets_received", s.packets_received),
        ("zk_packets_sent", s.packets_sent),
        ("zk_num_alive_connections", len(engine.clients)),
        ("zk_outstanding_requests", 0),
        ("zk_znode_count", len(engine.tree.nodes)),
        ("zk_watch_count", engine.watches.watch_count),
        ("zk_ephemerals_count", sum(len(p) for p in engine.tree.ephemerals.values())),
        ("zk_approximate_data_size", engine.tree.approximate_data_size),
        ("zk_global_sessions", len(engine.sessions)),
        ("zk_open_file_descriptor_count", open_fds),
        ("zk_max_file_descriptor_count", soft),
        ("zk_uptime", int((engine.wall_clock() - engine.started) * 1000)),
    ]
    # Mirrors add their upstream state: summed over mirrors, stale if any is.
    totals: dict[str, int] = {}
    for mount in engine.mounts:
        for key, value in mount.status().items():
            totals[key] = (
                max(totals.get(key, 0), value)
                if key.endswith("stale")
                else (totals.get(key, 0) + value)
            )
    values += sorted(totals.items())
    return "".join(f"{key}\t{value}\n" for key, value in values)


def wchs(engine: Engine) -> str:
    watches = engine.watches
    watchers = sum(1 for _ in watches.data_watchers())
    return (
        f"{watchers} connections watching {len(watches.data)} paths\n"
        f"Total watches:{watches.data_watch_count}\n"
    )


def wchc(engine: Engine) -> str:
    out = []
    for watcher, paths in engine.watches.data_watchers():
        assert isinstance(watcher, Client)
        out.append(f"0x{watcher.session.id:x}\n" + "".join(f"\t{p}\n" for p in sorted(paths)))
    return "".join(out) + "\n"


def wchp(engine: Engine) -> str:
    out = []
    for path, watchers in sorted(engine.watches.data.items()):
        ids = "".join(f"\t0x{w.session.id:x}\n" for w in watchers if isinstance(w, Client))
        out.append(f"{path}\n{ids}")
    return "".join(out) + "\n"


def dump(engine: Engine) -> str:
    sessions = list(engine.sessions)
    lines = [f"SessionTracker dump:\nGlobal Sessions({len(sessions)}):\n"]
    lines += [f"0x{s.id:x}\t{s.timeout_ms}ms\n" for s in sessions]
    owners = engine.tree.ephemerals
    lines.append(f"ephemeral nodes dump:\nSessions with Ephemerals ({len(owners)}):\n")
    for owner, paths in sorted(owners.items()):
        lines.append(f"0x{owner:x}:\n" + "".join(f"\t{p}\n" for p in sorted(paths)))
    return "".join(lines)


def envi(engine: Engine) -> str:
    values = [
        ("zookeeper.version", SERVER_VERSION),
        ("host.name", platform.node()),
        ("python.version", sys.version.split()[0]),
        ("os.name", platform.system()),
        ("os.arch", platform.machine()),
        ("os.version", platform.release()),
        ("user.dir", os.getcwd()),
    ]
    return "Environment:\n" + "".join(f"{k}={v}\n" for k, v in values)


def conf(engine: Engine, settings: Mapping[str, object]) -> str:
    c = engine.config
    values = {
        **settings,
        "tickTime": c.tick_ms,
        "minSessionTimeout": c.min_timeout,
        "maxSessionTimeout": c.max_timeout,
        "serverId": 0,
    }
    return "".join(f"{k}={v}\n" for k, v in values.items())


def crst(engine: Engine) -> str:
    for client in engine.clients:
        client.received = client.sent = 0
    return "Connection stats reset.\n"


def srst(engine: Engine) -> str:
    engine.stats.reset()
    return "Server stats reset.\n"


COMMANDS: dict[str, Callable[[Engine], str]] = {
    "ruok": lambda engine: "imok",
    "isro": lambda engine: "rw",
    "srvr": srvr,
    "stat": stat,
    "cons": cons,
    "mntr": mntr,
    "wchs": wchs,
    "wchc": wchc,
    "wchp": wchp,
    "dump": dump,
    "envi": envi,
    "crst": crst,
    "srst": srst,
}


def answer(engine: Engine, word: str, settings: Mapping[str, object]) -> str:
    """The reply to ``word``: its answer, or ZooKeeper's refusal.

    ``settings`` are the server's own (port, data directory, limits), for
    ``conf``; under :data:`WHITELIST_SETTING` they may hold the
    :class:`FourLetterWhitelist` (:data:`DEFAULT_WHITELIST` when absent). A
    word zkgate does not serve (``dirs``, ``gtmk``, ``hash``, ``stmk``) gets
    the same refusal, listed or not.
    """
    whitelist = settings.get(WHITELIST_SETTING, DEFAULT_WHITELIST)
    if not isinstance(whitelist, FourLetterWhitelist):
        raise TypeError(f"settings[{WHITELIST_SETTING!r}] must be a FourLetterWhitelist, "
                        f"not {type(whitelist).__name__}")  # fmt: skip
    if not whitelist.allows(word):
        log.debug("four-letter word refused: not in the whitelist", extra={"word": word})
        return refusal(word)
    if word == "conf":
        shown = {key: value for key, value in settings.items() if key != WHITELIST_SETTING}
        return conf(engine, shown)
    command = COMMANDS.get(word)
    if command is None:
        return refusal(word)
    return command(engine)
