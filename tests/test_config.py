"""The TOML configuration, the gateway it starts, and ``zkgate serve --config``.

Every mistake must be reported at start with the path of the bad key, and the
command line must turn it into exit status 2 and one clear line, never a
traceback. Adapter kinds come from the real entry-point registry, except
where a test registers :class:`~tests.test_fanin.ScriptedUpstream` as the
``scripted`` kind through ``kinds=``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from dispatcher.config import (
    ConfigError,
    DispatcherConfig,
    ZooKeeperConfig,
    load_config,
    parse_config,
)
from dispatcher.core.model import Instance, Source
from dispatcher.core.upstream import Listing, Status, Upstream
from dispatcher.gateway import Gateway, run_gateway
from dispatcher.settings import reject_unknown
from tests.servers import REPO_ROOT, free_port, wait_for
from tests.test_fanin import ScriptedUpstream


def scripted_kind(kind: str) -> type[Upstream]:
    if kind == "scripted":
        return ScriptedUpstream
    raise ConfigError(f"unknown upstream kind {kind!r} (known: scripted)")


def write(tmp_path: Path, text: str, name: str = "zkgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    node_id = "gw-eu-1"

    [zookeeper]
    listen = "127.0.0.1:12181"
    data_dir = "state"
    tick_ms = 500
    max_buffer = 2097152
    max_client_cnxns = 0
    extended_types = true
    container_check_ms = 1000
    super_digest = "super:D/InIHSb7yEEbrWz8b9l71RjZJU="

    [dispatcher]
    interest = "subscribed"
    subscriber_queue = 64

    [[upstream]]
    name = "primary"
    kind = "scripted"

    [[upstream]]
    name = "fallback"
    kind = "scripted"
    crash_first = true
"""


# ------------------------------------------------------------- good files


def test_a_good_file_is_read_whole_and_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), kinds=scripted_kind)
    assert config.node_id == "gw-eu-1" and config.node == "gw-eu-1"
    assert config.zookeeper == ZooKeeperConfig(
        listen="127.0.0.1:12181",
        data_dir=tmp_path / "state",  # relative to the file, not the working directory
        tick_ms=500,
        max_buffer=2097152,
        max_client_cnxns=0,
        extended_types=True,
        container_check_ms=1000,
        super_digest="super:D/InIHSb7yEEbrWz8b9l71RjZJU=",
    )
    assert config.dispatcher == DispatcherConfig(interest="subscribed", subscriber_queue=64)
    assert [(u.name, u.kind, dict(u.options)) for u in config.upstreams] == [
        ("primary", "scripted", {}),
        ("fallback", "scripted", {"crash_first": True}),
    ]
    built = config.upstreams[1].build()
    assert isinstance(built, ScriptedUpstream) and built.name == "fallback" and built.crash_first

    again = parse_config(config.to_mapping(), kinds=scripted_kind)
    assert again == config


def test_a_mirror_table_is_read_whole_and_round_trips(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            textwrap.dedent("""
        [[mirror]]
        root = "/services"
        hosts = "zk1:2181, [::1]:2182"
        session_timeout = 4.5
        auth = ["digest:zkgate:secret"]
        max_sessions = 8
    """),
        )
    )
    (mirror,) = config.mirrors
    assert mirror.root == "/services"
    assert mirror.hosts == (("zk1", 2181), ("::1", 2182))
    assert mirror.session_timeout_ms == 4500
    assert mirror.auth == (("digest", b"zkgate:secret"),)
    assert mirror.max_sessions == 8
    assert parse_config(config.to_mapping()) == config


def test_serve_names_a_mirror_upstream_it_cannot_reach(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        textwrap.dedent(f"""
        [[mirror]]
        root = "/m"
        hosts = "127.0.0.1:{free_port()}"
        connect_timeout = 1
    """),
        "mirror.toml",
    )
    result = _zkgate("--config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(tmp_path / "data"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "mirror /m: upstream 127.0.0.1:" in result.stderr
    assert "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_file_is_the_plain_embedded_registry(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.upstreams == ()
    assert config.zookeeper.listen == "127.0.0.1:2181"
    assert config.dispatcher.interest == "all"
    assert config.node.endswith(":2181")  # <hostname>:<port> by default


def test_command_line_flags_override_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), kinds=scripted_kind)
    overridden = config.with_overrides(listen="127.0.0.1:3000", data_dir=tmp_path / "cli")
    assert overridden.zookeeper.listen == "127.0.0.1:3000"
    assert overridden.zookeeper.port == 3000
    assert overridden.zookeeper.data_dir == tmp_path / "cli"
    assert overridden.zookeeper.tick_ms == 500  # not overridden: the file's
    with pytest.raises(ConfigError, match="--listen"):
        config.with_overrides(listen="nonsense")
    with pytest.raises(ConfigError, match="--tick-ms"):
        config.with_overrides(tick_ms=0)


# -------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('colour = "blue"\n', "colour: unknown key"),
        ('[zookeeper]\nlisten = "127.0.0.1:2181"\nlisen = "x"\n', "zookeeper.lisen: unknown key"),
        ("[dispatcher]\nsubscriber_queue = 10\nqueue = 1\n", "dispatcher.queue: unknown key"),
        ('[zookeeper]\ntick_ms = "2000"\n', "zookeeper.tick_ms: must be an integer, not a string"),
        ("[zookeeper]\ntick_ms = 0\n", "zookeeper.tick_ms: must be at least 1"),
        ("[zookeeper]\nextended_types = 1\n", "zookeeper.extended_types: must be true or false"),
        ('[zookeeper]\nlisten = "localhost"\n', "zookeeper.listen: expected HOST:PORT"),
        ("node_id = 7\n", "node_id: must be a string, not an integer"),
        ('zookeeper = "x"\n', "zookeeper: must be a table"),
        ('[dispatcher]\ninterest = "some"\n', "dispatcher.interest: must be one of 'all'"),
        ('[upstream]\nname = "a"\nkind = "scripted"\n', "upstream: must be an array of tables"),
        ('[[upstream]]\nkind = "scripted"\n', "upstream[0].name: missing"),
        ('[[upstream]]\nname = "a"\n', "upstream[0].kind: missing"),
        ('[[upstream]]\nname = "a"\nkind = 3\n', "upstream[0].kind: must be a string"),
        (
            '[[upstream]]\nname = "a"\nkind = "scripted"\n[[upstream]]\nname = "b"\n'
            'kind = "zookeper"\n',
            "upstream[1].kind: unknown upstream kind 'zookeper'",
        ),
        (
            '[[upstream]]\nname = "a"\nkind = "scripted"\n[[upstream]]\nname = "a"\n'
            'kind = "scripted"\n',
            "upstream[1].name: 'a' is already the name of upstream[0]",
        ),
        (
            '[[upstream]]\nname = "a"\nkind = "scripted"\nhosts = "zk:2181"\n',
            "upstream[0] ('a').hosts: unknown key (known here: crash_first)",
        ),
        ("[zookeeper\n", "not valid TOML"),
        ('[[mirror]]\nroot = "/m"\n', "mirror[0].hosts: missing"),
        ('[[mirror]]\nhosts = "zk:2181"\n', "mirror[0].root: missing"),
        ('[[mirror]]\nroot = "/m"\nhosts = "zk"\n', "mirror[0].hosts: expected HOST:PORT"),
        ('[[mirror]]\nroot = "/zookeeper/x"\nhosts = "zk:1"\n', "mirror[0].root: cannot be"),
        ('[[mirror]]\nroot = "/m"\nhosts = "zk:1"\nauth = ["ip:1"]\n', "mirror[0].auth[0]:"),
        (
            '[[mirror]]\nroot = "/m"\nhosts = "zk:1"\nsession_timeout = 0\n',
            "mirror[0].session_timeout: must be a positive number",
        ),
        ('[[mirror]]\nroot = "/m"\nhosts = "zk:1"\nroots = []\n', "mirror[0].roots: unknown key"),
        (
            '[[mirror]]\nroot = "/m"\nhosts = "zk:1"\nsession_timeout = inf\n',
            "mirror[0].session_timeout: must be a finite number of seconds, not inf",
        ),
        (
            '[[projection]]\nroot = "/m"\nlayout = "plain"\n'
            '[[mirror]]\nroot = "/m/a"\nhosts = "zk:1"\n',
            "mirror[0].root: /m/a overlaps the mount at /m",
        ),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), kinds=scripted_kind)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_kinds_come_from_the_entry_point_registry(tmp_path: Path) -> None:
    path = write(tmp_path, '[[upstream]]\nname = "a"\nkind = "no-such-registry"\n')
    with pytest.raises(ConfigError, match=r"^upstream\[0\]\.kind: unknown upstream kind"):
        load_config(path)


def _install_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kinds: str) -> None:
    """Register upstream kinds the way an installed distribution does (a dist-info on the path)."""
    dist_info = tmp_path / "site" / "zkgate_test_kinds-0.dist-info"
    dist_info.mkdir(parents=True)
    metadata = "Metadata-Version: 2.1\nName: zkgate-test-kinds\nVersion: 0\n"
    (dist_info / "METADATA").write_text(metadata)
    lines = "".join(f"{name} = {target}\n" for name, target in kinds.items())
    (dist_info / "entry_points.txt").write_text(f"[zkgate.upstreams]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_kinds_are_loaded_one_at_a_time_so_a_broken_one_fails_only_its_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_kinds(
        tmp_path,
        monkeypatch,
        scripted="tests.test_fanin:ScriptedUpstream",
        broken="tests.no_such_module:Nothing",
    )
    good = load_config(write(tmp_path, '[[upstream]]\nname = "a"\nkind = "scripted"\n'))
    assert good.upstreams[0].factory is ScriptedUpstream
    bad = write(tmp_path, '[[upstream]]\nname = "a"\nkind = "broken"\n', "bad.toml")
    with pytest.raises(ConfigError, match=r"^upstream\[0\]\.kind: .*'broken' cannot be loaded"):
        load_config(bad)
    unknown = write(tmp_path, '[[upstream]]\nname = "a"\nkind = "nope"\n', "unknown.toml")
    with pytest.raises(ConfigError, match=r"known: .*broken, .*scripted"):
        load_config(unknown)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


# ---------------------------------------------------------------- gateway


async def test_the_gateway_serves_zookeeper_and_fans_in_its_upstreams(tmp_path: Path) -> None:
    text = GOOD.replace("127.0.0.1:12181", "127.0.0.1:0").replace(
        'interest = "subscribed"', 'interest = "all"'
    )
    config = load_config(write(tmp_path, text), kinds=scripted_kind)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            gateway: Gateway = await nursery.start(run_gateway, config)
        assert gateway.port
        assert (tmp_path / "state" / "tree.sqlite3").exists()
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        async with stream:
            await stream.send_all(b"ruok")
            with trio.fail_after(10):
                assert await stream.receive_some(4) == b"imok"

        primary, fallback = gateway.upstreams
        assert isinstance(primary, ScriptedUpstream) and isinstance(fallback, ScriptedUpstream)
        with trio.fail_after(10):
            await primary.running()
            await fallback.running()
        instance = Instance("orders", "o1", "10.0.0.1", 80, source=Source("primary", "/o1"))
        await primary.send(Status(True), Listing((instance,)))
        assert gateway.fanin.node_id == "gw-eu-1"
        assert list(gateway.fanin.snapshot.full("orders").instances) == ["10.0.0.1:80"]
        assert "primary" not in gateway.fanin.stale
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ command line


def _zkgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "serve", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('colour = "blue"\n', "colour: unknown key"),
        ('[zookeeper]\ntick_ms = "fast"\n', "zookeeper.tick_ms: must be an integer"),
        ('[[upstream]]\nname = "a"\nkind = "no-such"\n', "upstream[0].kind: unknown upstream"),
    ],
)
def test_serve_with_a_bad_config_exits_2_with_one_clear_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text, "bad.toml")
    result = _zkgate("--config", str(path), "--listen", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(tmp_path / "data"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "bad.toml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # it stopped before touching anything


def test_serve_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    result = _zkgate("--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_a_config_and_flags_that_override_it(
    tmp_path: Path, zkgate_factory: object
) -> None:
    # The file asks for another port and directory; the harness's --listen
    # and --data-dir, typed on the command line, must win.
    path = write(
        tmp_path,
        f"""\
        node_id = "gw-test"
        [zookeeper]
        listen = "127.0.0.1:{free_port()}"
        data_dir = "from-file"
        tick_ms = 200
        four_letter_words = "ruok, conf"
        """,
    )
    server = zkgate_factory(["--config", str(path)])  # type: ignore[operator]
    wait_for(lambda: server.four_letter("ruok") == "imok", 10, "zkgate answers ruok")
    assert (server.data_dir / "tree.sqlite3").exists()
    assert not (tmp_path / "from-file").exists()
    # tick_ms came from the file: ZooKeeper's `conf` shows the session bounds it implies.
    conf = server.four_letter("conf")
    assert "maxSessionTimeout=4000" in conf, conf


async def test_a_config_of_static_files_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resolved through the entry-point group, as `zkgate serve --config` does.
    _install_kinds(tmp_path, monkeypatch, static="adapters.static:StaticUpstream")
    (tmp_path / "db.toml").write_text(
        '[[instance]]\nservice = "db"\nhost = "10.0.0.9"\nport = 5432\nmetadata = {role = "a"}\n'
    )
    (tmp_path / "db-legacy.toml").write_text(
        '[[instance]]\nservice = "db"\nhost = "10.0.0.9"\nport = 5432\nweight = 1\n'
        '[[instance]]\nservice = "db"\nhost = "10.0.0.8"\nport = 5432\n'
    )
    path = write(
        tmp_path,
        f"""\
        node_id = "gw-static"
        [zookeeper]
        listen = "127.0.0.1:0"
        data_dir = "state"
        [[upstream]]
        name = "db"
        kind = "static"
        path = "{tmp_path / "db.toml"}"
        poll_interval = 0.05
        [[upstream]]
        name = "db-legacy"
        kind = "static"
        path = "{tmp_path / "db-legacy.toml"}"
        poll_interval = 0.05
        """,
    )
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            gateway: Gateway = await nursery.start(run_gateway, config)

        def both_listed() -> bool:
            instances = gateway.fanin.snapshot.full("db").instances
            first = instances.get("10.0.0.9:5432")
            return len(instances) == 2 and first is not None and first.weight == 100

        # The two files load in either order; wait for both to be merged.
        async with gateway.fanin.subscribe(["db"]) as sub:
            with trio.fail_after(10):
                while not both_listed():
                    await sub.__anext__()
        merged = gateway.fanin.snapshot.full("db").instances
        assert sorted(merged) == ["10.0.0.8:5432", "10.0.0.9:5432"]
        first = merged["10.0.0.9:5432"]
        assert first.source is not None and first.source.adapter == "db"
        assert first.weight == 100 and dict(first.metadata) == {"role": "a"}
        nursery.cancel_scope.cancel()


def test_every_unknown_key_message_names_the_keys_known_there(tmp_path: Path) -> None:
    """One format for every table of every program: ``<where>.<key>: unknown key
    (known here: ...)``, the known keys in a stable order (a typo is the usual cause)."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[subscriptions]\ntokn = "x"\n'))
    assert str(caught.value).startswith("subscriptions.tokn: unknown key (known here: ")
    assert "token" in str(caught.value)

    class TableError(ValueError):
        pass

    with pytest.raises(TableError) as error:
        reject_unknown({"a": 1, "zz": 2, "b": 3}, frozenset({"b", "a", "c"}), "t", TableError)
    assert str(error.value) == "t.zz: unknown key (known here: a, b, c)"
    with pytest.raises(ConfigError, match=r"^colour: unknown key \(known here: x, y\)$"):
        reject_unknown({"colour": 1}, ["x", "y"], "")
    # [membership], which zkgate meta reads too, says it the same way.
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[membership]\nkind = "memory"\nrooot = "/x"\n[sharding]\n'))
    assert str(caught.value) == (
        "membership.rooot: unknown key (known here: kind, address, root, session_timeout, "
        "stamp_grace, tls, sasl_username, sasl_password_file)"
    )


# ------------------------------------------------- [membership] without [sharding]


def test_membership_alone_is_the_policy_store_and_no_shard() -> None:
    """``[membership]`` without ``[sharding]`` holds the policies only: the shard's rules
    (interest "subscribed", no projections) do not apply, so a Dubbo projection can show
    them, and the file round-trips."""
    data = {
        "dispatcher": {"interest": "all"},
        "membership": {"kind": "zookeeper", "address": "127.0.0.1:2181", "root": "/zkgate"},
        "governance": {"token": "t0ken", "max_history": 5},
        "projection": [{"root": "/dubbo", "layout": "dubbo"}],
    }
    config = parse_config(data)
    assert config.sharding is None
    assert config.membership is not None and config.membership.kind == "zookeeper"
    assert config.dispatcher.interest == "all"
    assert [p.layout for p in config.projections] == ["dubbo"]
    assert parse_config(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sharding": {}}, "sharding: needs a [membership] table (where the shards register)"),
        (
            {"membership": {"kind": "memory"}, "sharding": {},
             "projection": [{"root": "/dubbo", "layout": "dubbo"}]},
            "projection: not supported with [sharding] yet",
        ),
        (
            {"membership": {"kind": "memory"}, "sharding": {},
             "dispatcher": {"interest": "all"}},
            "dispatcher.interest: must be 'subscribed' with [sharding]",
        ),
        ({"membership": {"kind": "zookeeper"}}, "membership.address"),
    ],
)  # fmt: skip
def test_a_shard_still_needs_membership_and_keeps_its_rules(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value).startswith(expected), str(caught.value)


async def test_a_gateway_with_membership_alone_owns_every_service_and_loads_policies(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "node_id": "gw-solo",
            "zookeeper": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")},
            "admin": {"enabled": False},
            "membership": {"kind": "memory"},
            "upstream": [{"name": "primary", "kind": "scripted"}],
            "projection": [{"root": "/dubbo", "layout": "dubbo"}],
        },
        kinds=scripted_kind,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            gateway: Gateway = await nursery.start(run_gateway, config)
        # No shard: nothing registered, no ownership map, every service loaded here.
        assert gateway.sharding is None and gateway.ownership is None
        assert gateway.policies is not None and gateway.policies.version == 0
        (primary,) = gateway.upstreams
        assert isinstance(primary, ScriptedUpstream)
        with trio.fail_after(10):
            await primary.running()
        instance = Instance("orders", "o1", "10.0.0.1", 80, source=Source("primary", "/o1"))
        await primary.send(Status(True), Listing((instance,)))
        assert list(gateway.fanin.snapshot.full("orders").instances) == ["10.0.0.1:80"]
        nursery.cancel_scope.cancel()
