"""The four-letter-word whitelist: ZooKeeper's ``4lw.commands.whitelist`` on zkgate.

``dump``, ``wchc``, ``wchp`` and ``cons`` list sessions, watched paths and
client addresses to anyone who can open the port, and ``crst``/``srst`` wipe
statistics; the whitelist (``[zookeeper] four_letter_words``, ``--4lw``) is how
an operator keeps them shut. Its syntax and its refusals are ZooKeeper's, so
each whitelist is checked against a real ZooKeeper 3.8 given the same one.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatcher.config import ConfigError, load_config, parse_config
from dispatcher.zk.codec.connection import FOUR_LETTER_WORDS
from dispatcher.zk.codec.protocol import OpCode
from dispatcher.zk.server.engine import Engine
from dispatcher.zk.server.fourletter import (
    COMMANDS,
    DEFAULT_WHITELIST,
    WHITELIST_SETTING,
    FourLetterWhitelist,
    answer,
    refusal,
)
from dispatcher.zk.server.store import TreeStore
from tests.servers import REPO_ROOT, ServerFactory, ZkgateServer, ZooKeeperServer, four_letter
from tests.zkwire import WireClient

#: What the default keeps shut: words that disclose sessions, paths, client
#: addresses or the host, and words that reset statistics.
REFUSED_BY_DEFAULT = ("dump", "wchp", "wchc", "cons", "crst", "srst", "envi", "conf", "stat",
                      "wchs")  # fmt: skip
ALLOWED_BY_DEFAULT = ("ruok", "srvr", "mntr", "isro")
#: The words zkgate answers when they are allowed; ZooKeeper's others (dirs,
#: gtmk, hash, stmk) are refused by zkgate even when listed.
SERVED = frozenset(COMMANDS) | {"conf"}
UNSERVED = FOUR_LETTER_WORDS - SERVED


# ------------------------------------------------------------------ parsing


def test_the_syntax_is_zookeepers_comma_string() -> None:
    # FourLetterCommands.isEnabled: split on commas, trim, skip empty entries.
    assert FourLetterWhitelist.parse(" stat ,, ruok,").words == {"stat", "ruok", "srvr"}
    assert FourLetterWhitelist.parse("mntr") == FourLetterWhitelist.of(["mntr"])
    # "*" anywhere means every word, as in ZooKeeper.
    assert FourLetterWhitelist.parse("*").words == FOUR_LETTER_WORDS
    assert FourLetterWhitelist.parse("ruok, *").words == FOUR_LETTER_WORDS


def test_srvr_is_always_allowed_as_zookeeper_allows_it() -> None:
    # ZooKeeper adds srvr to any list because zkServer.sh status depends on it.
    assert FourLetterWhitelist.parse("").allows("srvr")
    assert FourLetterWhitelist.parse("ruok").allows("srvr")
    assert not FourLetterWhitelist.parse("ruok").allows("mntr")


def test_the_default_allows_only_words_that_disclose_and_change_nothing() -> None:
    assert DEFAULT_WHITELIST.words == set(ALLOWED_BY_DEFAULT)
    assert not any(DEFAULT_WHITELIST.allows(word) for word in REFUSED_BY_DEFAULT)


@pytest.mark.parametrize("text", ["ruok", "", "*", "stat, cons ,dump", "ruok,srvr,mntr,isro"])
def test_the_comma_string_reads_back_as_the_same_whitelist(text: str) -> None:
    whitelist = FourLetterWhitelist.parse(text)
    assert FourLetterWhitelist.parse(str(whitelist)) == whitelist


@pytest.mark.parametrize(
    ("text", "bad"),
    [("ruok, bogus", "bogus"), ("RUOK", "RUOK"), ("ruok srvr", "ruok srvr"), ("*, wchz", "wchz")],
)
def test_a_word_zookeeper_does_not_know_is_an_error_naming_it(text: str, bad: str) -> None:
    # ZooKeeper silently ignores these; a misspelt word refused forever is the
    # mistake a whitelist must not hide.
    with pytest.raises(ValueError, match=re.escape(f"unknown four-letter word '{bad}'")):
        FourLetterWhitelist.parse(text)


# -------------------------------------------------------------- configuration


def test_the_key_is_read_from_the_file_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "zkgate.toml"
    path.write_text('[zookeeper]\nfour_letter_words = "ruok, stat ,cons"\n')
    config = load_config(path)
    assert config.zookeeper.four_letter_words.words == {"ruok", "stat", "cons", "srvr"}
    assert parse_config(config.to_mapping()) == config
    assert parse_config({}).zookeeper.four_letter_words == DEFAULT_WHITELIST


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ruok, bogus", "zookeeper.four_letter_words: unknown four-letter word 'bogus'"),
        (["ruok", "srvr"], "zookeeper.four_letter_words: must be a comma-separated string"),
        (True, "zookeeper.four_letter_words: must be a comma-separated string"),
    ],
)
def test_a_bad_value_in_the_file_names_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"zookeeper": {"four_letter_words": value}})


def test_the_flag_overrides_the_file_and_a_bad_flag_is_named() -> None:
    config = parse_config({"zookeeper": {"four_letter_words": "*"}})
    overridden = config.with_overrides(four_letter_words="ruok")
    assert overridden.zookeeper.four_letter_words == FourLetterWhitelist.parse("ruok")
    with pytest.raises(ConfigError, match=r"command line --4lw: unknown four-letter word 'nope'"):
        config.with_overrides(four_letter_words="ruok,nope")


def test_serve_stops_on_a_bad_flag_with_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "serve", "--4lw", "ruok,stats",
         "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--admin-listen", "off"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--4lw: unknown four-letter word 'stats'" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------- answer()


def test_conf_does_not_show_the_whitelist_and_no_setting_means_the_default(
    tmp_path: Path,
) -> None:
    store = TreeStore(tmp_path)
    try:
        engine = Engine(store)
        # An embedder that passes no whitelist gets the safe default.
        assert answer(engine, "dump", {}) == refusal("dump")
        assert answer(engine, "ruok", {}) == "imok"
        settings = {"clientPort": 2181, WHITELIST_SETTING: FourLetterWhitelist.parse("*")}
        conf = answer(engine, "conf", settings)
        # ZooKeeper's conf lists server settings, not the whitelist.
        assert "clientPort=2181\n" in conf and "4lw" not in conf and "whitelist" not in conf
    finally:
        store.close()


# ------------------------------------------------------------ zkgate, as served


def test_zkgate_refuses_by_default_what_discloses_or_changes_state(zkgate: ZkgateServer) -> None:
    received = _traffic(zkgate)
    assert zkgate.four_letter("srst") == refusal("srst")
    # The refused srst reset nothing.
    assert _mntr(zkgate)["zk_packets_received"] >= received
    for word in REFUSED_BY_DEFAULT:
        assert zkgate.four_letter(word) == refusal(word)
    assert zkgate.four_letter("ruok") == "imok"
    assert zkgate.four_letter("isro") == "rw"
    assert zkgate.four_letter("srvr").startswith("Zookeeper version: ")


def test_a_star_whitelist_answers_every_word_zkgate_serves(
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    server = zkgate_factory(["--4lw", "*"])
    for word in sorted(SERVED):
        text = server.four_letter(word)
        assert text and text != refusal(word), word
    received = _traffic(server)
    assert server.four_letter("srst") == "Server stats reset.\n"
    assert _mntr(server)["zk_packets_received"] < received


# ---------------------------------------------------------- against ZooKeeper

#: (zkgate's --4lw, or None for its default; ZooKeeper's 4lw.commands.whitelist)
WHITELISTS = {
    "zkgate-default": (None, "ruok, srvr, mntr, isro"),
    "star": ("*", "*"),
    # Whitespace, an empty entry and srvr left out (both add it themselves).
    "zookeeper-syntax": (" stat ,, ruok,cons ", " stat ,, ruok,cons "),
}


@pytest.mark.parametrize("case", sorted(WHITELISTS))
def test_zkgate_answers_every_word_as_zookeeper_with_the_same_whitelist(
    case: str,
    zookeeper_factory: ServerFactory[ZooKeeperServer],
    zkgate_factory: ServerFactory[ZkgateServer],
) -> None:
    flag, value = WHITELISTS[case]
    # A server of its own even for "*": the shared one's watches and sessions
    # (other tests') would show in wchp, cons and dump, and zkgate's never do.
    zookeeper = zookeeper_factory(config={"4lw.commands.whitelist": value})
    zkgate = zkgate_factory([] if flag is None else ["--4lw", flag])
    whitelist = FourLetterWhitelist.parse(value)
    for word in sorted(FOUR_LETTER_WORDS):
        if word in UNSERVED and whitelist.allows(word):
            continue  # ZooKeeper answers it; zkgate does not serve it (see the README)
        expected, actual = _exchange(zookeeper, word), _exchange(zkgate, word)
        # Both close cleanly after the answer, refused or not.
        assert expected[1] == actual[1] == "eof", (word, expected, actual)
        refused = expected[0] == refusal(word)
        assert refused == (not whitelist.allows(word)), (word, expected)
        if refused:
            assert actual[0] == expected[0], word
        else:
            assert _kind(word, actual[0]) == _kind(word, expected[0]), (word, expected, actual)


def _exchange(server: ZooKeeperServer | ZkgateServer, word: str) -> tuple[str, str]:
    """The answer to ``word`` and how the server ended the connection ("eof" or
    "reset"); the client keeps its side open, as ``nc`` does."""
    deadline = time.monotonic() + 10
    chunks: list[bytes] = []
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(word.encode("ascii"))
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks).decode(), "reset"
            if not chunk:
                return b"".join(chunks).decode(), "eof"
            chunks.append(chunk)


_WATCHES_BY_SESSION = re.compile(r"(0x[0-9a-f]+\n(\t/.*\n)*)*\n")
_WATCHES_BY_PATH = re.compile(r"(/.*\n(\t0x[0-9a-f]+\n)*)*\n")


def _kind(word: str, text: str) -> object:
    """What a monitoring tool relies on in an answer: its layout, not its numbers."""
    lines = text.splitlines()
    if word in ("ruok", "isro", "crst", "srst"):
        return text
    if word in ("srvr", "stat"):
        # Headings in order; a client line (" /ip:port[...]") is data.
        return [line.split(":")[0] for line in lines if ":" in line and line[:1] != " "]
    if word == "mntr":
        return lines[0].split("\t")[0], all(len(line.split("\t")) == 2 for line in lines)
    if word == "envi":
        return lines[0], all("=" in line for line in lines[1:])
    if word == "conf":
        return all("=" in line for line in lines) and "clientPort=" in text
    if word == "cons":
        return text.endswith("\n") and all(line.startswith(" /") for line in lines if line)
    if word == "wchs":
        return bool(re.fullmatch(r"\d+ connections watching \d+ paths\nTotal watches:\d+\n", text))
    if word == "wchc":
        return bool(_WATCHES_BY_SESSION.fullmatch(text))
    if word == "wchp":
        return bool(_WATCHES_BY_PATH.fullmatch(text))
    if word == "dump":
        return lines[0], "ephemeral nodes dump:\nSessions with Ephemerals (" in text
    raise AssertionError(f"no kind for {word!r}")


def _traffic(server: ZkgateServer) -> int:
    """Send a session's worth of packets; ``mntr``'s zk_packets_received after them."""
    with WireClient(server.host, server.port) as client:
        client.connect()
        for _ in range(20):
            client.call(OpCode.PING)
    received = _mntr(server)["zk_packets_received"]
    assert received >= 20
    return received


def _mntr(server: ZkgateServer) -> dict[str, int]:
    values = {}
    for line in four_letter(server.host, server.port, "mntr").splitlines():
        key, _, value = line.partition("\t")
        if value.lstrip("-").isdigit():
            values[key] = int(value)
    return values
