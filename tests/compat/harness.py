"""What every client-compatibility test shares: the servers, and the clients' reports.

Each compatibility test runs the same client script against real ZooKeeper 3.8
(the reference: a check that fails there is a wrong check), against
``zkgate serve`` on its embedded tree, and against a zkgate that mirrors the
real ZooKeeper (the script's path is the mirror's root, so every request it
makes goes through the mirror to the ensemble). :func:`make_target` gives the
test one of the three, with a znode path of its own; :func:`parse_report` reads the ``OK name`` /
``FAIL name: why`` lines that the Java and JavaScript scripts print.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs
import pytest

from tests.servers import ServerFactory, ZkgateServer, ZooKeeperServer

__all__ = [
    "CURATOR_JARS",
    "TARGET_KINDS",
    "ZKGATE_ARGS",
    "Check",
    "ClientRun",
    "Target",
    "compile_java",
    "curator_classpath",
    "failed_checks",
    "make_target",
    "parse_report",
    "run_client",
]

#: Debian's Curator jars. They name their own dependencies (guava, jackson, slf4j-api,
#: zookeeper-jute, netty) in their manifests' Class-Path, which both javac and java
#: follow, so only the entry points are listed; a logging binding is added per program.
CURATOR_JARS = (
    "/usr/share/java/curator-recipes.jar",
    "/usr/share/java/curator-x-discovery.jar",
    "/usr/share/java/curator-framework.jar",
    "/usr/share/java/curator-client.jar",
    "/usr/share/java/zookeeper.jar",
)


def curator_classpath(*extra: str) -> str:
    """A classpath of ``extra`` entries, then :data:`CURATOR_JARS`."""
    return ":".join([*extra, *CURATOR_JARS])


def compile_java(source: Path, out: Path, logging_jar: str) -> Path:
    """``source`` compiled against :data:`CURATOR_JARS` into ``out`` (class files are never
    committed); fails the test, saying what to install, when the JDK or a jar is missing."""
    javac = shutil.which("javac")
    if javac is None:
        pytest.fail("javac not found: install a JDK (scripts/test installs default-jdk-headless)")
    missing = [jar for jar in [*CURATOR_JARS, logging_jar] if not Path(jar).exists()]
    if missing:
        pytest.fail(f"missing jars {missing}: install the Debian packages that scripts/test lists")
    compiled = subprocess.run(
        [javac, "-nowarn", "-d", str(out), "-cp", curator_classpath(), str(source)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert compiled.returncode == 0, f"javac failed:\n{compiled.stdout}\n{compiled.stderr}"
    return out


#: The reference first, so that in a run's output a broken check shows up
#: against ZooKeeper before anyone blames zkgate.
TARGET_KINDS = ("zookeeper", "zkgate", "mirror")

#: zkgate's tickTime in these tests: the same 200 ms as the shared ZooKeeper's,
#: so both grant the same session timeouts (400 ms .. 4 s).
ZKGATE_ARGS = ("--tick-ms", "200")


@attrs.frozen
class Target:
    """One server a client script runs against, and where that test may write."""

    kind: str
    host: str
    port: int
    base: str
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """For failure messages: which server, and where its log is."""
        return f"{self.kind} at {self.address} (server log: {self.log_path})"


def make_target(request: pytest.FixtureRequest, kind: str, base: str) -> Target:
    """Real ZooKeeper (the shared session server) or a fresh zkgate of this test's own.

    The shared ZooKeeper holds every test's znodes, so ``base`` (a test's
    ``unique_path``) is where this test works on either server; a fresh zkgate
    gets the same kind of path so that scripts never depend on an empty tree.
    """
    if kind == "zookeeper":
        server: ZooKeeperServer | ZkgateServer = request.getfixturevalue("zookeeper")
    elif kind == "zkgate":
        factory: ServerFactory[ZkgateServer] = request.getfixturevalue("zkgate_factory")
        server = factory(list(ZKGATE_ARGS))
    elif kind == "mirror":
        upstream: ZooKeeperServer = request.getfixturevalue("zookeeper")
        tmp_path: Path = request.getfixturevalue("tmp_path")
        config = tmp_path / "mirror.toml"
        config.write_text(
            f'[zookeeper]\nmax_client_cnxns = 0\n\n[[mirror]]\nroot = "{base}"\n'
            f'hosts = "{upstream.address}"\nsession_timeout = 4.0\n'
        )
        factory = request.getfixturevalue("zkgate_factory")
        server = factory([*ZKGATE_ARGS, "--config", str(config)])
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    return Target(kind, server.host, server.port, base, server.log_path)


@attrs.frozen
class ClientRun:
    """What one run of a client program printed, for assertions and failure messages."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 40) -> str:
        """The end of stdout and stderr, to put in an assertion message."""
        out = "\n".join(self.stdout.splitlines()[-lines:])
        err = "\n".join(self.stderr.splitlines()[-lines:])
        return f"--- stdout (tail)\n{out}\n--- stderr (tail)\n{err}"


def run_client(
    command: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientRun:
    """Run a client program to completion; a hang past ``timeout`` fails the test.

    The program's own deadlines should fire long before ``timeout``; this one
    only keeps a wedged JVM or node process from wedging the suite. stdin is
    empty, never the test runner's own.
    """
    try:
        completed = subprocess.run(
            list(command),
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=None if env is None else dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(
            f"{command[0]} did not finish within {timeout}s\n"
            f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
        )
    return ClientRun(tuple(command), completed.returncode, completed.stdout, completed.stderr)


@attrs.frozen
class Check:
    """One ``OK name`` or ``FAIL name: why`` line of a client script's report."""

    name: str
    ok: bool
    why: str = ""


_REPORT_LINE = re.compile(r"^(OK|FAIL) ([^\s:]+)(?::\s?(.*))?$")


def parse_report(stdout: str) -> dict[str, Check]:
    """The checks a client script reported, by name; other lines are ignored.

    A name reported twice keeps its first failure, so a flapping check cannot
    hide behind a later OK.
    """
    checks: dict[str, Check] = {}
    for line in stdout.splitlines():
        match = _REPORT_LINE.match(line.strip())
        if match is None:
            continue
        status, name, why = match.groups()
        check = Check(name, status == "OK", why or "")
        previous = checks.get(name)
        if previous is None or (previous.ok and not check.ok):
            checks[name] = check
    return checks


def failed_checks(report: Mapping[str, Check], expected: Iterable[str], scope: str) -> list[str]:
    """Every way ``report`` falls short of ``expected``: failed, missing or unexpected checks.

    ``scope`` is the prefix of the names that belong to this run (a scenario
    name, e.g. ``"mutex"``); a failure of the scope itself (``FAIL mutex: ...``,
    the script's word for "the scenario threw") is reported too.
    """
    expected_names = [f"{scope}.{name}" for name in expected]
    problems: list[str] = []
    if scope in report and not report[scope].ok:
        problems.append(f"{scope}: {report[scope].why}")
    for name in expected_names:
        check = report.get(name)
        if check is None:
            problems.append(f"{name}: not reported")
        elif not check.ok:
            problems.append(f"{name}: {check.why}")
    unexpected = sorted(
        name for name in report if name.startswith(f"{scope}.") and name not in expected_names
    )
    problems.extend(f"{name}: reported but not expected by the test" for name in unexpected)
    return problems
