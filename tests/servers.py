"""Real servers as child processes, for tests and benchmarks.

zkgate's specification is "what a real ZooKeeper 3.8 answers", and its upstreams
are real ZooKeeper and etcd servers, so the integration tests, differential
tests and benchmarks all need those servers running for real, not mocked. This
module starts them (and zkgate itself) as child processes:

* on loopback only (127.0.0.1), on ports picked by :func:`free_port`;
* each in its own directory (config, data, one log file per server);
* ready only when the server *answers* (``ruok``/``srvr``, etcd's ``/health``),
  never after a fixed delay;
* stopped reliably: SIGTERM, then SIGKILL after a grace period; also killed
  when the Python process exits (``atexit``, and the kernel's parent-death
  signal where that is safe), so no stray JVM outlives a test run.

A stopped or killed server can be started again on the same port and the same
data directory: that is how durability and upstream-outage tests work.

It deliberately does not import pytest, so ``bench/`` can use it too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, NamedTuple, NoReturn, Self, TypedDict, TypeVar

__all__ = [
    "LOOPBACK",
    "NETTY_TLS_JARS",
    "EtcdServer",
    "EtcdTls",
    "PortAllocator",
    "ServerError",
    "ServerFactory",
    "ServerProcess",
    "ServerStartError",
    "ZkgateServer",
    "ZooKeeperEnsemble",
    "ZooKeeperEnsembleMember",
    "ZooKeeperServer",
    "four_letter",
    "free_port",
    "secure_zookeeper_config",
    "wait_for",
]

LOOPBACK = "127.0.0.1"
"""The only address any server started here listens on."""

REPO_ROOT = Path(__file__).resolve().parents[1]

NETTY_TLS_JARS = (
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
)

ZOOKEEPER_CLASSPATH = ":".join(
    [
        "/usr/share/java/zookeeper.jar",
        "/usr/share/java/slf4j-log4j12.jar",
        "/usr/share/java/log4j-1.2.jar",
        *NETTY_TLS_JARS,
    ]
)
"""Debian's zookeeper.jar names its other dependencies in its manifest's Class-Path;
the logging binding has to be added by hand, and so do the Netty jars its TLS
port (NettyServerCnxnFactory) and its Netty client socket need but the manifest
leaves out."""

_LOG4J_PROPERTIES = """\
# Written by tests/servers.py: everything goes to stdout, which is the log file.
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n
"""

_POLL_INTERVAL = 0.05
_BIND_ERROR = re.compile(r"address already in use", re.IGNORECASE)


class ServerError(RuntimeError):
    """A server could not be started, stopped or reached as asked."""


class ServerStartError(ServerError):
    """A server did not become ready; the message carries the tail of its log."""


# --------------------------------------------------------------------------- ports


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(port: int) -> bool:
    """True if nothing holds ``127.0.0.1:port`` right now.

    No SO_REUSEADDR on purpose: a port with connections lingering in TIME_WAIT is
    refused too, which is the conservative answer for a port we are about to hand
    to a server.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out loopback TCP ports that are free now and never twice per allocator.

    Ports come from just below the kernel's ephemeral range (by default
    20000..32767), not from ``bind(("127.0.0.1", 0))``: a server such as a JVM
    takes a second or two between being told its port and binding it, and in
    that window an outgoing connection from any process on the machine may be
    given an ephemeral port as its local port. Ports below the ephemeral range
    are never chosen by the kernel that way. The choice is random so that
    several test runs on the same machine rarely race for the same port; the
    servers retry on a fresh port if they lose such a race anyway.
    """

    def __init__(self, low: int = 20000, high: int | None = None) -> None:
        ephemeral_low, _ = _ephemeral_port_range()
        self._low = low
        self._high = (ephemeral_low - 1) if high is None else high
        self._handed_out: set[int] = set()
        self._lock = threading.Lock()
        self._random = random.Random()

    def allocate(self) -> int:
        with self._lock:
            if self._high - self._low > 1000:
                for _ in range(200):
                    port = self._random.randint(self._low, self._high)
                    if port not in self._handed_out and _can_bind(port):
                        self._handed_out.add(port)
                        return port
            # Tiny or exhausted range: fall back to the kernel's choice.
            for _ in range(200):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((LOOPBACK, 0))
                    port = sock.getsockname()[1]
                if port not in self._handed_out:
                    self._handed_out.add(port)
                    return port
        raise ServerError("could not find a free loopback port")


def _worker_allocator() -> PortAllocator:
    """This process's allocator: under pytest-xdist, each worker draws from its own
    slice of the range, so two workers never hand out the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return PortAllocator()
    low = 20000
    high = _ephemeral_port_range()[0] - 1
    width = (high - low + 1) // count
    index = int(worker[2:])
    return PortAllocator(low + index * width, low + (index + 1) * width - 1)


# The one deliberate piece of process-wide state in this module: "never hand out
# the same port twice" only holds if every caller in the process shares the set.
_PROCESS_PORTS = _worker_allocator()


def free_port() -> int:
    """A loopback port that is free now and that no other caller in this process got."""
    return _PROCESS_PORTS.allocate()


# ---------------------------------------------------------------- small utilities


def four_letter(host: str, port: int, word: str, timeout: float = 5.0) -> str:
    """Send a ZooKeeper four-letter word and return the whole answer.

    The server closes the connection after answering, so the answer is
    everything read until EOF. ``timeout`` bounds the whole exchange.
    Raises ``OSError`` (including ``TimeoutError``) if the server is not there.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode("ascii"))
        chunks: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{word!r} to {host}:{port}: no EOF within {timeout}s")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = _POLL_INTERVAL,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns something truthy, and return that.

    For tests that must wait for something another process does (a watch to
    fire, a session to expire): a deadline and a condition instead of a bare
    sleep. Raises ``TimeoutError`` naming ``message`` when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not reached within {timeout}s")
        time.sleep(interval)


def _probe(host: str, port: int, word: str) -> str | None:
    """A four-letter word that treats "not there (yet)" as no answer."""
    try:
        return four_letter(host, port, word, timeout=2.0)
    except OSError:
        return None


def _parse_mode(srvr: str | None) -> str | None:
    if srvr is None:
        return None
    match = re.search(r"^Mode: (\S+)", srvr, re.MULTILINE)
    return match.group(1) if match else None


def _format_config_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _listening_socket_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (any address), from /proc/net."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local_address.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _process_listens_on(pid: int, port: int) -> bool:
    """True if process ``pid`` holds the socket listening on ``port``.

    Answers True where /proc cannot tell (not Linux), since then nothing better
    is known than "something answers on the port".
    """
    if not Path("/proc/net/tcp").exists():
        return True
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = _listening_socket_inodes(port)
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[len("socket:[") : -1] in inodes:
            return True
    return False


def _require_executable(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name!r} not found on PATH ({hint})")
    return path


# ---------------------------------------------------------- process lifecycle


class ServerProcess:
    """One server child process: directory, log, start, readiness, stop, kill.

    Subclasses say how to write their config (:meth:`_prepare`), what to run
    (:meth:`_command`) and when the server counts as ready (:meth:`_is_ready`).

    The directory is ``base_dir`` if given (kept afterwards, e.g. under pytest's
    tmp_path so logs survive a failure), else a fresh temp dir that
    :meth:`close` removes. stdout and stderr of every run are appended to
    :attr:`log_path`, each run starting with a ``=== start`` banner line.
    ``env`` adds to (or overrides) the environment the child inherits.
    """

    kind = "server"
    host: str
    port: int

    def __init__(
        self,
        *,
        base_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"zkgate-{self.kind}-"))
            self._owns_dir = True
        else:
            self.base_dir = Path(base_dir)
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self.log_path = self.base_dir / f"{self.kind}.log"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._starts = 0
        # Ports were picked by us and no run has succeeded yet, so losing a bind
        # race may be answered by picking new ones. After the first success the
        # address is part of the server's identity (clients reconnect to it).
        self._may_repick_ports = False

    # ----------------------------------------------------------- subclass hooks

    def _prepare(self) -> None:
        """Write config files before a run (called before every start)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _repick_ports(self) -> None:
        """Choose new ports after losing a bind race (only before the first success)."""

    def _child_env(self) -> dict[str, str]:
        """The child's environment: ours, plus the ``env`` given to the constructor."""
        return {**os.environ, **self._env}

    # --------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """The child process exists and has not exited (it may not be ready yet)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server and return once it answers; raise ServerStartError if not.

        On the first start, a lost race for a port (another process bound it
        between allocation and use) is retried on fresh ports.
        """
        attempts = 3 if self._may_repick_ports else 1
        for attempt in range(attempts):
            self.launch()
            try:
                self.wait_ready()
            except ServerStartError:
                lost_port_race = bool(_BIND_ERROR.search(self.log_tail()))
                if attempt + 1 < attempts and lost_port_race:
                    self._repick_ports()
                    continue
                raise
            return self
        raise AssertionError("unreachable")

    def launch(self) -> None:
        """Spawn the process without waiting for it to answer (see :meth:`wait_ready`).

        Separate from :meth:`start` so that the members of an ensemble can all
        be spawned before any of them is waited on: none is ready alone.
        """
        if self.running:
            raise ServerError(f"{self.kind} in {self.base_dir} is already running")
        self._prepare()
        command = self._command()
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            # The kernel kills the child when its parent *thread* dies, so this is
            # only safe from the main thread (whose death is the process's death).
            # setpriv execs, so the pid stays the server's own.
            command = ["setpriv", "--pdeathsig", "KILL", "--", *command]
        env = self._child_env()
        self._starts += 1
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== start #{self._starts}: {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=env,
                close_fds=True,
            )
        atexit.register(self._kill_at_exit)

    def wait_ready(self, deadline: float | None = None) -> None:
        """Block until the server answers, its process exits, or the deadline passes.

        ``deadline`` is a ``time.monotonic()`` value; the default is
        ``startup_timeout`` from now. On failure the process is killed and
        ServerStartError carries the tail of the log.
        """
        if self._process is None:
            raise ServerError(f"{self.kind} was never launched")
        if deadline is None:
            deadline = time.monotonic() + self.startup_timeout
        process = self._process
        while True:
            returncode = process.poll()
            if returncode is not None:
                self._fail(f"exited with status {returncode} before answering")
            # Something answering on the port is not enough: after a lost race it
            # may be another run's server. It must be this process's socket.
            if self._is_ready() and _process_listens_on(process.pid, self.port):
                self._may_repick_ports = False
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not become ready within {self.startup_timeout:.0f}s")
            # Waiting on the process is the pause between probes: it returns at
            # once if the process dies, so a crash is reported without delay.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=min(_POLL_INTERVAL, remaining))

    def _fail(self, what: str) -> NoReturn:
        self.kill()
        raise ServerStartError(
            f"{self.kind} in {self.base_dir} {what}; last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def request_stop(self) -> None:
        """Send SIGTERM without waiting, so that several servers can shut down at once;
        :meth:`stop` then waits (and kills if need be)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if still alive after ``timeout`` (default stop_timeout).

        Keeps the directory, so :meth:`start` can bring the server back on the
        same data. Returns the exit status, or None if it was not running.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self.request_stop()
            try:
                process.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._forget()
        return process.returncode

    def kill(self) -> int | None:
        """SIGKILL, as a crash would: no shutdown hook runs, nothing is flushed."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
            process.wait()
        self._forget()
        return process.returncode

    def restart(self) -> Self:
        """Stop gracefully and start again on the same ports and data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _forget(self) -> None:
        atexit.unregister(self._kill_at_exit)

    def _kill_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines that the current (or last) run wrote to the log."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - 64 * 1024))
                data = log.read()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {state} dir={self.base_dir}>"


# ------------------------------------------------------------------ ZooKeeper


class _ZooKeeperProcess(ServerProcess):
    """What standalone servers and ensemble members share: zoo.cfg, log4j, the JVM."""

    kind = "zookeeper"
    main_class = ""

    def __init__(
        self,
        *,
        port: int | None = None,
        tick_time_ms: int = 200,
        config: Mapping[str, object] | None = None,
        system_properties: Mapping[str, object] | None = None,
        jvm_args: Sequence[str] = (),
        heap: str = "256m",
        base_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            base_dir=base_dir, env=env, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.host = LOOPBACK
        self._may_repick_ports = port is None
        self.port = free_port() if port is None else port
        self.tick_time_ms = tick_time_ms
        self.config: dict[str, object] = dict(config or {})
        self.system_properties: dict[str, object] = dict(system_properties or {})
        self.jvm_args = list(jvm_args)
        self.heap = heap
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "zoo.cfg"
        self.log4j_path = self.base_dir / "log4j.properties"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, a connect string for this one server."""
        return f"{self.host}:{self.port}"

    @property
    def min_session_timeout_ms(self) -> int:
        """The smallest session timeout the server grants (ZooKeeper: 2 ticks by default)."""
        return int(str(self.config.get("minSessionTimeout", 2 * self.tick_time_ms)))

    @property
    def max_session_timeout_ms(self) -> int:
        """The largest session timeout the server grants (ZooKeeper: 20 ticks by default)."""
        return int(str(self.config.get("maxSessionTimeout", 20 * self.tick_time_ms)))

    def four_letter(self, word: str, timeout: float = 5.0) -> str:
        return four_letter(self.host, self.port, word, timeout)

    @property
    def mode(self) -> str | None:
        """``standalone``, ``leader`` or ``follower`` from ``srvr``; None if not serving."""
        return _parse_mode(_probe(self.host, self.port, "srvr"))

    def _base_config(self) -> dict[str, object]:
        return {
            "tickTime": self.tick_time_ms,
            "dataDir": self.data_dir,
            "clientPort": self.port,
            "clientPortAddress": self.host,
            "admin.enableServer": False,
            "4lw.commands.whitelist": "*",
            "maxClientCnxns": 0,
        }

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log4j_path.write_text(_LOG4J_PROPERTIES)
        settings = {**self._base_config(), **self.config}
        lines = [f"{key}={_format_config_value(value)}" for key, value in settings.items()]
        self.config_path.write_text("# Written by tests/servers.py\n" + "\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        java = _require_executable("java", "install default-jre-headless")
        properties = [
            f"-D{key}={_format_config_value(value)}"
            for key, value in self.system_properties.items()
        ]
        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            f"-Dlog4j.configuration=file:{self.log4j_path}",
            *properties,
            *self.jvm_args,
            "-cp",
            ZOOKEEPER_CLASSPATH,
            self.main_class,
            str(self.config_path),
        ]

    def _repick_ports(self) -> None:
        self.port = free_port()


def secure_zookeeper_config(
    secure_port: int,
    keystore: Path,
    truststore: Path,
    password: str,
    *,
    client_auth: str = "need",
) -> dict[str, object]:
    """zoo.cfg entries for a TLS client port (``secureClientPort``) beside the plain one.

    The keystores are PKCS12 (see ``tests/certs.py``). ``client_auth`` is
    ``ssl.clientAuth`` (``need``, ``want``, ``none``); a client that presents a
    verified certificate is authenticated as ``x509:<subject DN>``. The plain
    port stays, so readiness probes and four-letter words work as for any server.
    """
    return {
        "secureClientPort": secure_port,
        "serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
        "ssl.keyStore.location": keystore,
        "ssl.keyStore.password": password,
        "ssl.keyStore.type": "PKCS12",
        "ssl.trustStore.location": truststore,
        "ssl.trustStore.password": password,
        "ssl.trustStore.type": "PKCS12",
        "ssl.clientAuth": client_auth,
        "authProvider.x509": "org.apache.zookeeper.server.auth.X509AuthenticationProvider",
    }


class SaslOptions(TypedDict):
    """zoo.cfg entries and JVM properties, as :class:`ZooKeeperServer` takes them."""

    config: dict[str, object]
    system_properties: dict[str, object]


def sasl_zookeeper(jaas: Path, *, required: bool = False) -> SaslOptions:
    """Keyword arguments that give a ZooKeeper server DIGEST-MD5 SASL from ``jaas``.

    ``ZooKeeperServer(**sasl_zookeeper(jaas))``: the JAAS file's ``Server``
    section lists the users, the ``sasl`` ACL scheme is registered
    (``SASLAuthenticationProvider``) and, with ``required``, every request
    before SASL ends the connection (``zookeeper.sessionRequireClientSASLAuth``).
    """
    properties: dict[str, object] = {"java.security.auth.login.config": jaas}
    if required:
        properties["zookeeper.sessionRequireClientSASLAuth"] = "true"
    return {
        "config": {
            "authProvider.sasl": "org.apache.zookeeper.server.auth.SASLAuthenticationProvider"
        },
        "system_properties": properties,
    }


class ZooKeeperServer(_ZooKeeperProcess):
    """A standalone ZooKeeper 3.8 server (``ZooKeeperServerMain``) on 127.0.0.1.

    ``tick_time_ms`` defaults to 200 so that session-expiry tests are fast; the
    granted session timeouts then follow ZooKeeper's rule (2 to 20 ticks:
    400 ms to 4 s) unless ``config`` sets ``minSessionTimeout`` /
    ``maxSessionTimeout``. ``config`` entries are added to (or override)
    zoo.cfg; ``system_properties`` become JVM ``-Dkey=value`` flags and
    ``jvm_args`` are passed as they are. Ready when ``ruok`` answers ``imok``
    and ``srvr`` reports ``Mode: standalone``.
    """

    main_class = "org.apache.zookeeper.server.ZooKeeperServerMain"

    def _is_ready(self) -> bool:
        if _probe(self.host, self.port, "ruok") != "imok":
            return False
        return self.mode == "standalone"


class ZooKeeperEnsembleMember(_ZooKeeperProcess):
    """One ``QuorumPeerMain`` of a :class:`ZooKeeperEnsemble`; ready once it is leader or
    follower."""

    main_class = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

    def __init__(
        self,
        myid: int,
        *,
        quorum_port: int,
        election_port: int,
        peers: Mapping[int, tuple[int, int]],
        init_limit: int,
        sync_limit: int,
        tick_time_ms: int,
        config: Mapping[str, object] | None,
        system_properties: Mapping[str, object] | None,
        jvm_args: Sequence[str],
        heap: str,
        base_dir: Path,
        startup_timeout: float,
        stop_timeout: float,
    ) -> None:
        super().__init__(
            port=None,
            tick_time_ms=tick_time_ms,
            config=config,
            system_properties=system_properties,
            jvm_args=jvm_args,
            heap=heap,
            base_dir=base_dir,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        # Ports are shared with the peers' configs, so they must never be re-picked.
        self._may_repick_ports = False
        self.myid = myid
        self.quorum_port = quorum_port
        self.election_port = election_port
        self.peers = dict(peers)
        self.init_limit = init_limit
        self.sync_limit = sync_limit

    def _base_config(self) -> dict[str, object]:
        settings = super()._base_config()
        settings["initLimit"] = self.init_limit
        settings["syncLimit"] = self.sync_limit
        for myid, (quorum_port, election_port) in sorted(self.peers.items()):
            settings[f"server.{myid}"] = f"{LOOPBACK}:{quorum_port}:{election_port}"
        return settings

    def _prepare(self) -> None:
        super()._prepare()
        (self.data_dir / "myid").write_text(f"{self.myid}\n")

    def _is_ready(self) -> bool:
        if _probe(self.host, self.port, "ruok") != "imok":
            return False
        return self.mode in ("leader", "follower")


class ZooKeeperEnsemble:
    """A ZooKeeper ensemble (3 nodes by default) on 127.0.0.1, one JVM per member.

    Ready when every member answers ``srvr`` as leader or follower. Members can
    be killed and started again one at a time (:meth:`kill_member`,
    :meth:`start_member`); the others keep serving while a quorum remains.
    ``init_limit``/``sync_limit`` are in ticks and are generous by default,
    because several JVMs starting at once on a small machine are slow to sync.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        tick_time_ms: int = 200,
        init_limit: int = 50,
        sync_limit: int = 25,
        config: Mapping[str, object] | None = None,
        system_properties: Mapping[str, object] | None = None,
        jvm_args: Sequence[str] = (),
        heap: str = "256m",
        base_dir: Path | str | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if size < 1:
            raise ValueError("an ensemble needs at least one member")
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="zkgate-ensemble-"))
            self._owns_dir = True
        else:
            self.base_dir = Path(base_dir)
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self.startup_timeout = startup_timeout
        peers = {myid: (free_port(), free_port()) for myid in range(1, size + 1)}
        self.members: list[ZooKeeperEnsembleMember] = [
            ZooKeeperEnsembleMember(
                myid,
                quorum_port=quorum_port,
                election_port=election_port,
                peers=peers,
                init_limit=init_limit,
                sync_limit=sync_limit,
                tick_time_ms=tick_time_ms,
                config=config,
                system_properties=system_properties,
                jvm_args=jvm_args,
                heap=heap,
                base_dir=self.base_dir / f"member-{myid}",
                startup_timeout=startup_timeout,
                stop_timeout=stop_timeout,
            )
            for myid, (quorum_port, election_port) in peers.items()
        ]

    @property
    def connect_string(self) -> str:
        """``127.0.0.1:P1,127.0.0.1:P2,...`` for clients that should fail over."""
        return ",".join(member.address for member in self.members)

    @property
    def addresses(self) -> list[str]:
        return [member.address for member in self.members]

    def start(self) -> Self:
        """Spawn every stopped member, then wait (one shared deadline) for all of them."""
        deadline = time.monotonic() + self.startup_timeout
        stopped = [member for member in self.members if not member.running]
        try:
            for member in stopped:
                member.launch()
            for member in stopped:
                member.wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        return self

    def member(self, index: int) -> ZooKeeperEnsembleMember:
        """The member at ``index`` (0-based; its ``myid`` is ``index + 1``)."""
        return self.members[index]

    def kill_member(self, index: int) -> None:
        self.members[index].kill()

    def stop_member(self, index: int) -> None:
        self.members[index].stop()

    def start_member(self, index: int) -> None:
        """Start one member again on its data; returns once it has rejoined."""
        self.members[index].start()

    def leader_index(self) -> int | None:
        """Index of the member that reports ``Mode: leader`` now, if any."""
        for index, member in enumerate(self.members):
            if member.running and member.mode == "leader":
                return index
        return None

    def stop(self) -> None:
        for member in self.members:
            member.request_stop()
        for member in self.members:
            member.stop()

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[ZooKeeperEnsembleMember]:
        return iter(self.members)

    def __repr__(self) -> str:
        return f"<ZooKeeperEnsemble {self.connect_string} dir={self.base_dir}>"


# ----------------------------------------------------------------------- etcd


class EtcdTls(NamedTuple):
    """What a TLS etcd serves with: its certificate and key (PEM), and the CA that must
    have signed every client's certificate (``--client-cert-auth``)."""

    cert: Path
    key: Path
    ca: Path


class EtcdServer(ServerProcess):
    """A single-member etcd 3.4 server on 127.0.0.1 (client and peer URLs on loopback).

    Ready when ``GET /health`` reports healthy. ``endpoint`` is ``127.0.0.1:P``
    (what python-etcd3 wants as host and port), ``client_url`` the same as a URL.
    ``extra_args`` are appended to etcd's command line.

    With ``tls``, the client URL is ``https://``: etcd serves ``tls.cert``
    (``--cert-file``, ``--key-file``) and refuses any client without a
    certificate signed by ``tls.ca`` (``--client-cert-auth``,
    ``--trusted-ca-file``). The readiness probe presents etcd's own certificate
    as its client certificate (tests/certs.py issues certificates good for both
    ends). Peer traffic stays plain, on loopback.

    Raft timing is shortened (heartbeat 25 ms, election 250 ms, against etcd's
    100 ms / 1000 ms): a lone member waits one election timeout before it
    leads again after a restart, and outage tests restart etcd often. With a
    single member there is no peer to lose leadership to, so short timeouts
    cost nothing but an occasional "slow heartbeat" warning in the log.
    """

    kind = "etcd"

    def __init__(
        self,
        *,
        port: int | None = None,
        peer_port: int | None = None,
        name: str = "default",
        heartbeat_interval_ms: int = 25,
        election_timeout_ms: int = 250,
        extra_args: Sequence[str] = (),
        tls: EtcdTls | None = None,
        base_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            base_dir=base_dir, env=env, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.tls = tls
        self.host = LOOPBACK
        self._may_repick_ports = port is None and peer_port is None
        self.port = free_port() if port is None else port
        self.peer_port = free_port() if peer_port is None else peer_port
        self.name = name
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.extra_args = list(extra_args)
        self.data_dir = self.base_dir / "data"
        # Never route loopback health checks through an HTTP proxy from the environment.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if tls is not None:
            context = ssl.create_default_context(cafile=tls.ca)
            context.load_cert_chain(tls.cert, tls.key)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._http = urllib.request.build_opener(*handlers)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return self.endpoint

    @property
    def client_url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def health(self) -> bool:
        """True if ``/health`` answers ``{"health": "true"}``."""
        try:
            with self._http.open(f"{self.client_url}/health", timeout=2.0) as response:
                body = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")).lower() == "true"

    def _command(self) -> list[str]:
        etcd = _require_executable("etcd", "install etcd-server")
        return [
            etcd,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{self.name}={self.peer_url}",
            "--heartbeat-interval",
            str(self.heartbeat_interval_ms),
            "--election-timeout",
            str(self.election_timeout_ms),
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
            "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return self.health()

    def _repick_ports(self) -> None:
        self.port = free_port()
        self.peer_port = free_port()


# ---------------------------------------------------------------------- zkgate


class ZkgateServer(ServerProcess):
    """zkgate itself: ``python -m dispatcher serve --listen 127.0.0.1:P --data-dir D``.

    Run as a separate process, the way users run it, so that tests see its real
    startup, its real shutdown and its durability across restarts (start again
    on the same ``data_dir``). Ready when ``ruok`` answers ``imok``.
    ``extra_args`` are appended to the command line.
    """

    kind = "zkgate"

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int | None = None,
        base_dir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            base_dir=base_dir, env=env, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.host = LOOPBACK
        self._may_repick_ports = port is None
        self.port = free_port() if port is None else port
        self.extra_args = list(extra_args)
        self.data_dir = self.base_dir / "data"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def four_letter(self, word: str, timeout: float = 5.0) -> str:
        return four_letter(self.host, self.port, word, timeout)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dispatcher",
            "serve",
            "--listen",
            self.address,
            "--data-dir",
            str(self.data_dir),
            # Many test servers run at once: none takes the admin port unless a
            # test asks (a later --admin-listen in extra_args wins).
            "--admin-listen",
            "off",
            *self.extra_args,
        ]

    def _child_env(self) -> dict[str, str]:
        # Unbuffered so the log tail shown on a failed start is complete, and the
        # repository on the path so the checkout under test is what runs even if
        # it is not the one installed in the environment.
        python_path = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        return {"PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, **super()._child_env()}

    def _is_ready(self) -> bool:
        return _probe(self.host, self.port, "ruok") == "imok"

    def _repick_ports(self) -> None:
        self.port = free_port()


# -------------------------------------------------------------------- factory

S = TypeVar("S", bound=ServerProcess)


class ServerFactory(Generic[S]):
    """Builds and starts servers of one kind under one directory; closes them all.

    A test (or benchmark) that needs servers of its own, e.g. one it may kill,
    calls the factory; whoever owns the factory calls :meth:`close` at the end,
    also when the test failed, and every server is stopped.
    """

    def __init__(self, make: Callable[..., S], base_dir: Path | str, prefix: str) -> None:
        self._make = make
        self._base_dir = Path(base_dir)
        self._prefix = prefix
        self.servers: list[S] = []

    def __call__(self, *args: object, start: bool = True, **kwargs: object) -> S:
        """Build one server in a fresh subdirectory; start it unless ``start=False``."""
        base_dir = self._base_dir / f"{self._prefix}-{len(self.servers)}"
        server = self._make(*args, base_dir=base_dir, **kwargs)
        self.servers.append(server)
        if start:
            server.start()
        return server

    def close(self) -> None:
        """Stop every server, newest first; re-raise the first failure after trying all."""
        errors: list[BaseException] = []
        for server in self.servers:
            server.request_stop()
        for server in reversed(self.servers):
            try:
                server.close()
            except Exception as exc:
                errors.append(exc)
        self.servers.clear()
        if errors:
            raise errors[0]
