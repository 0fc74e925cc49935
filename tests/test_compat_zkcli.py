"""ZooKeeper's own shell, zkCli.sh (Debian's zookeeper 3.8), against zkgate and real ZooKeeper.

zkCli.sh is what an operator types at a registry, so its output is what they
see. Each test feeds the same scripted session(s) on stdin to zkCli.sh against
both servers, normalizes what legitimately differs between two servers (zxids
become their rank within the test, times and session ids are dropped, whoami's
identities and getEphemerals' paths are sorted: ZooKeeper keeps both in hash
sets), and requires zkgate's transcript to equal real ZooKeeper's line for
line: a differential test with ZooKeeper as the specification. A few facts about the
reference transcript are asserted too, so a script that stopped doing what it
means to (a typo, a zkCli change) is noticed rather than compared to itself.

zkCli.sh prints command answers from its main thread and watch events from its
event thread, so the two interleave at random; the transcript keeps them as two
sequences, each in its own (deterministic) order.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from tests.compat.harness import TARGET_KINDS, Target, make_target

ZKCLI = Path("/usr/share/zookeeper/bin/zkCli.sh")

#: A whole session is a handful of requests; zkCli itself takes about a second to start.
SESSION_TIMEOUT = 60.0

_NOISE = re.compile(
    r"^(SLF4J: .*|Connecting to .*|Welcome to ZooKeeper!|JLine support is disabled|WATCHER::|\s*)$"
)
_EVENT = re.compile(r"^WatchedEvent state:\S+ type:\S+ path:\S+$")
#: The event a session's connection (or its failure) prints before any other.
_SESSION_EVENT = re.compile(r"^WatchedEvent state:\S+ type:None path:null$")
_ZXID_LINE = re.compile(r"^(cZxid|mZxid|pZxid) = (0x[0-9a-f]+)$")
_TIME_LINE = re.compile(r"^(ctime|mtime) = .*$")
_OWNER_LINE = re.compile(r"^ephemeralOwner = 0x(?!0$)[0-9a-f]+$")
_LIST_LINE = re.compile(r"^\[(.*)\]$")
_WHOAMI_HEADER = "Auth scheme: User"
_IDENTITY_LINE = re.compile(r"^[a-z0-9]+: \S+$")


def _sort_identities(lines: list[str]) -> list[str]:
    """Sort the identities under each ``whoami`` header.

    ZooKeeper keeps a connection's identities in a hash set
    (``ServerCnxn.authInfo``), so the order whoami lists them in is an
    accident of hashing that no client can rely on; which identities there
    are, each once, is what is compared.
    """
    out: list[str] = []
    index = 0
    while index < len(lines):
        out.append(lines[index])
        index += 1
        if out[-1] == _WHOAMI_HEADER:
            end = index
            while end < len(lines) and _IDENTITY_LINE.match(lines[end]):
                end += 1
            out.extend(sorted(lines[index:end]))
            index = end
    return out


@attrs.frozen
class Transcript:
    """What zkCli.sh printed in one session, normalized: answers and watch events apart."""

    lines: tuple[str, ...]
    events: tuple[str, ...]
    raw: str

    def text(self) -> str:
        return "\n".join([*self.lines, "-- events --", *self.events])


@attrs.frozen
class Pair:
    """The same test's base path on both servers: real ZooKeeper first, then zkgate."""

    reference: Target
    candidate: Target

    @property
    def base(self) -> str:
        return self.reference.base


@pytest.fixture
def pair(request: pytest.FixtureRequest, unique_path: str) -> Pair:
    # The mirror is left out here: its root would be this same path on the same
    # ZooKeeper, where the reference run has already written.
    reference, candidate = (make_target(request, kind, unique_path) for kind in TARGET_KINDS[:2])
    return Pair(reference, candidate)


def _run_session(target: Target, script: str) -> str:
    """Feed ``script`` to zkCli.sh and return what it printed, up to a sentinel event.

    zkCli.sh's ``quit`` exits the JVM while its event thread may still be
    printing, so the last watch events (and the "Closed" one) are sometimes
    lost. The session therefore ends with a watch on a sentinel node that it
    then creates: the event thread prints events in order, so once the
    sentinel's event is out every earlier one is too, and only then is
    ``quit`` sent. The sentinel's own lines are left out of the result.
    """
    sentinel = f"{target.base}-zkcli-end"
    marker = f"WatchedEvent state:SyncConnected type:NodeCreated path:{sentinel}"
    env = {
        **os.environ,
        # A small, quickly started client JVM: these sessions are short.
        "CLIENT_JVMFLAGS": "-Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1",
    }
    process = subprocess.Popen(
        [str(ZKCLI), "-server", target.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # some answers go to stderr, in order with stdout
        text=True,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []
    sentinel_seen = threading.Event()
    session_event_seen = threading.Event()

    def pump() -> None:
        for line in stdout:
            lines.append(line.rstrip("\n"))
            if _SESSION_EVENT.match(line.strip()):
                session_event_seen.set()
            if line.strip() == marker:
                sentinel_seen.set()

    reader = threading.Thread(target=pump, name="zkcli-stdout", daemon=True)
    reader.start()
    try:
        try:
            # zkCli's event thread prints the connection's event while the
            # first command may be printing its answer piece by piece (its
            # ``ls`` prints "[" first), and the two interleave: the script
            # starts once the event is out.
            session_event_seen.wait(SESSION_TIMEOUT)
            process.stdin.write(f"{script}stat -w {sentinel}\ncreate {sentinel}\n")
            process.stdin.flush()
            finished = sentinel_seen.wait(SESSION_TIMEOUT)
            process.stdin.write(f"delete {sentinel}\nquit\n")
            process.stdin.close()
        except BrokenPipeError:
            finished = False
        process.wait(timeout=SESSION_TIMEOUT)
        reader.join(SESSION_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "\n".join(lines)
    assert finished, (
        f"zkCli.sh against {target.describe()} never reached the end of its script:\n{output}"
    )
    end = next(index for index, line in enumerate(lines) if line.strip() == marker)
    return "\n".join(line for line in lines[:end] if sentinel not in line)


def _normalize(raws: Sequence[str]) -> list[Transcript]:
    """Normalize the sessions of one server together, so zxid ranks span all of them."""
    zxids = sorted(
        {
            int(match.group(2), 16)
            for raw in raws
            for line in raw.splitlines()
            if (match := _ZXID_LINE.match(line.strip()))
        }
    )
    rank = {zxid: index + 1 for index, zxid in enumerate(zxids)}
    transcripts = []
    for raw in raws:
        lines: list[str] = []
        events: list[str] = []
        for line in raw.splitlines():
            line = line.rstrip()
            if _NOISE.match(line):
                continue
            if _EVENT.match(line):
                events.append(line)
            elif match := _ZXID_LINE.match(line):
                lines.append(f"{match.group(1)} = zxid#{rank[int(match.group(2), 16)]}")
            elif _TIME_LINE.match(line):
                lines.append(f"{line.split(' ', 1)[0]} = <time>")
            elif _OWNER_LINE.match(line):
                lines.append("ephemeralOwner = <session>")
            elif match := _LIST_LINE.match(line):
                # zkCli sorts ls's children itself, but prints getEphemerals'
                # paths as the server keeps them: in a hash set.
                items = sorted(item for item in match.group(1).split(", ") if item)
                lines.append(f"[{', '.join(items)}]")
            else:
                lines.append(line)
        transcripts.append(Transcript(tuple(_sort_identities(lines)), tuple(events), raw))
    return transcripts


def differential(pair: Pair, *scripts: str) -> list[Transcript]:
    """Run the sessions in order on each server (both servers at once) and compare.

    Returns the reference (real ZooKeeper) transcripts, for the test's own
    assertions about what the script did.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [
            pool.submit(lambda t=target: [_run_session(t, script) for script in scripts])
            for target in (pair.reference, pair.candidate)
        ]
        reference_raw, candidate_raw = (run.result() for run in runs)
    reference, candidate = _normalize(reference_raw), _normalize(candidate_raw)
    for index, (expected, actual) in enumerate(zip(reference, candidate, strict=True)):
        if (expected.lines, expected.events) == (actual.lines, actual.events):
            continue
        diff = "\n".join(
            difflib.unified_diff(
                expected.text().splitlines(),
                actual.text().splitlines(),
                fromfile=f"real ZooKeeper, session {index + 1}",
                tofile=f"zkgate, session {index + 1}",
                lineterm="",
            )
        )
        pytest.fail(
            f"zkCli.sh session {index + 1} differs on {pair.candidate.describe()}:\n{diff}\n"
            f"--- script\n{scripts[index]}"
        )
    return reference


# ------------------------------------------------------------------------ tests


def test_create_get_set_ls(pair: Pair) -> None:
    """create (plain, -e, -s, -e -s, -c, -t), get -s, set (-v, -s), stat, ls (-s, -R) and errors."""
    b = pair.base
    first = f"""\
create {b} root-data
create {b}/child one
create -e {b}/eph ephemeral
create -s {b}/seq- s1
create -s {b}/seq- s2
create -e -s {b}/eseq- es
create -c {b}/container
create {b}/container/inside in
create -t 1000 {b}/ttl t
create {b}/child dup
create {b}/missing/x y
get {b}/child
get -s {b}/child
get -s {b}/eph
stat {b}/container
set {b}/child two
set -v 0 {b}/child three
set -s {b}/child four
get -s {b}/child
ls {b}
ls -s {b}
ls -R {b}
getEphemerals {b}
getAllChildrenNumber {b}
sync {b}
stat {b}/nonexistent
get {b}/nonexistent
ls {b}/nonexistent
"""
    # A second session: the first one's ephemerals went with it.
    second = f"""\
ls {b}
getEphemerals {b}
"""
    reference = differential(pair, first, second)
    lines = reference[0].lines
    for expected in [
        f"Created {b}/seq-0000000002",
        f"Created {b}/eseq-0000000004",
        f"Node already exists: {b}/child",
        f"Node does not exist: {b}/missing/x",
        f"version No is not valid : {b}/child",
        "ephemeralOwner = <session>",
        f"[{b}/eph, {b}/eseq-0000000004]",
        f"{b}/container/inside",
        "Sync is OK",
    ]:
        assert expected in lines, f"reference transcript lacks {expected!r}:\n{reference[0].raw}"
    assert reference[1].lines[0] == "[child, container, seq-0000000002, seq-0000000003]"


def test_acl_digest_and_ip(pair: Pair) -> None:
    """addauth digest, setAcl (auth, world, ip; -v, -s; invalid), getAcl (-s), enforcement."""
    b = pair.base
    owner = f"""\
create {b} x
create {b}/secret s3cret
addauth digest user:pass
setAcl {b}/secret auth:user:pass:cdrwa
getAcl {b}/secret
get {b}/secret
create {b}/open o
setAcl {b}/open world:anyone:r
getAcl {b}/open
set {b}/open changed
get {b}/open
getAcl -s {b}/secret
setAcl -v 0 {b}/secret auth:user:pass:cdrwa
setAcl -s {b}/secret auth:user:pass:rw
create {b}/ip i
setAcl {b}/ip ip:127.0.0.1:cdrwa
getAcl {b}/ip
get {b}/ip
setAcl {b}/ip ip:10.1.2.3:cdrwa
get {b}/ip
create {b}/bad b
setAcl {b}/bad nonsense:foo:r
setAcl {b}/bad digest:user:r
"""
    stranger = f"""\
getAcl {b}/secret
get {b}/secret
set {b}/secret nope
addauth digest user:wrong
get {b}/secret
addauth digest user:pass
get {b}/secret
delete {b}/secret
ls {b}
"""
    reference = differential(pair, owner, stranger)
    lines = reference[0].lines
    assert "'digest,'user:smGaoVKd/cQkjm7b88GyorAUz20=" in lines, reference[0].raw
    assert f"Insufficient permission : {b}/open" in lines, reference[0].raw
    assert f"Insufficient permission : {b}/ip" in lines, reference[0].raw
    assert f"Acl is not valid : {b}/bad" in lines, reference[0].raw
    assert "aclVersion = 2" in lines, reference[0].raw
    assert reference[1].lines.count(f"Insufficient permission : {b}/secret") == 4
    assert "s3cret" in reference[1].lines
    assert reference[1].lines[-1] == "[bad, ip, open]"


def test_whoami(pair: Pair) -> None:
    """whoami lists the connection's identities: its ip and each digest added, once each."""
    b = pair.base
    script = f"""\
whoami
addauth digest alice:a-secret
whoami
addauth digest bob:b-secret
addauth digest alice:a-secret
whoami
create {b} w
"""
    reference = differential(pair, script)
    assert reference[0].lines[:2] == ("Auth scheme: User", "ip: 127.0.0.1"), reference[0].raw
    assert reference[0].lines[-5:-1] == (
        "Auth scheme: User",
        "digest: alice",
        "digest: bob",
        "ip: 127.0.0.1",
    ), reference[0].raw


def test_add_watch_persistent_recursive(pair: Pair) -> None:
    """addWatch -m PERSISTENT_RECURSIVE / PERSISTENT, with get -w, ls -w and stat -w beside them."""
    b = pair.base
    script = f"""\
create {b} w
create {b}/a 1
addWatch -m PERSISTENT_RECURSIVE {b}
create {b}/a/b 2
set {b}/a 3
set {b} 4
delete {b}/a/b
create {b}/c 5
get -w {b}/c
set {b}/c 6
addWatch -m PERSISTENT {b}/a
create {b}/a/x 7
set {b}/a/x 8
set {b}/a 9
ls -w {b}/a
create {b}/a/y 10
stat -w {b}/nothere
create {b}/nothere 11
addWatch -m BOGUS {b}
"""
    reference = differential(pair, script)

    def event(kind: str, path: str) -> str:
        return f"WatchedEvent state:SyncConnected type:{kind} path:{path}"

    assert reference[0].events == (
        "WatchedEvent state:SyncConnected type:None path:null",
        event("NodeCreated", f"{b}/a/b"),
        event("NodeDataChanged", f"{b}/a"),
        event("NodeDataChanged", b),
        event("NodeDeleted", f"{b}/a/b"),
        event("NodeCreated", f"{b}/c"),
        event("NodeDataChanged", f"{b}/c"),
        event("NodeCreated", f"{b}/a/x"),
        event("NodeChildrenChanged", f"{b}/a"),
        event("NodeDataChanged", f"{b}/a/x"),
        event("NodeDataChanged", f"{b}/a"),
        event("NodeCreated", f"{b}/a/y"),
        event("NodeChildrenChanged", f"{b}/a"),
        event("NodeCreated", f"{b}/nothere"),
    ), reference[0].raw


def test_delete_and_deleteall(pair: Pair) -> None:
    """delete (-v, not empty, missing) and deleteall (a subtree, -b batches, the base itself)."""
    b = pair.base
    script = f"""\
create {b} d
create {b}/x
create {b}/x/y
create {b}/x/y/z
create {b}/x/w
delete {b}/x
delete -v 5 {b}/x/y/z
delete {b}/x/y/z
ls -R {b}
deleteall {b}/x
ls {b}
create {b}/p
create {b}/p/q
create {b}/p/r
deleteall {b}/p -b 1
ls {b}
create {b}/again
deleteall {b}
stat {b}
delete {b}
"""
    reference = differential(pair, script)
    lines = reference[0].lines
    assert f"Node not empty: {b}/x" in lines, reference[0].raw
    assert f"version No is not valid : {b}/x/y/z" in lines, reference[0].raw
    assert lines.count("[]") == 2, reference[0].raw
    assert lines[-2:] == (f"Node does not exist: {b}", f"Node does not exist: {b}")


def test_removewatches(pair: Pair) -> None:
    """removewatches: no watcher to remove, a data watch (-d), a persistent watch (-a)."""
    b = pair.base
    script = f"""\
create {b} q
removewatches {b}
get -w {b}
removewatches {b} -d
set {b} q2
addWatch {b}
removewatches {b} -a
set {b} q3
create {b}/after
"""
    reference = differential(pair, script)
    assert f"KeeperErrorCode = No such watcher for {b}" in reference[0].lines, reference[0].raw
    assert reference[0].events[1:] == (
        f"WatchedEvent state:SyncConnected type:DataWatchRemoved path:{b}",
        f"WatchedEvent state:SyncConnected type:PersistentWatchRemoved path:{b}",
    ), reference[0].raw


def test_system_tree(pair: Pair) -> None:
    """/zookeeper and its config node, config, and reconfig on a standalone server."""
    b = pair.base
    script = f"""\
ls /zookeeper
get /zookeeper/config
config
getAcl /zookeeper/config
reconfig -add server.5=127.0.0.1:1234:1235;1236
create {b} s
"""
    reference = differential(pair, script)
    assert reference[0].lines[0] == "[config, quota]", reference[0].raw
    assert "KeeperErrorCode = Reconfig is disabled" in reference[0].lines, reference[0].raw


def test_quota(pair: Pair) -> None:
    """setquota / listquota / delquota, and the usage ZooKeeper keeps in zookeeper_stats."""
    b = pair.base
    script = f"""\
create {b} q
create {b}/a x
setquota -n 5 {b}
listquota {b}
create {b}/b yy
set {b}/a xyz
listquota {b}
get /zookeeper/quota{b}/zookeeper_limits
get /zookeeper/quota{b}/zookeeper_stats
setquota -n 2 {b}/a
delete {b}/b
listquota {b}
delquota -n {b}
listquota {b}
delquota {b}
listquota {b}
ls /zookeeper/quota{b}
"""
    reference = differential(pair, script)
    lines = reference[0].lines
    # The usage counts the quota root and everything below it: nodes and data bytes.
    assert f"Output stat for {b} count=2,bytes=2" in lines, reference[0].raw
    assert f"Output stat for {b} count=3,bytes=6" in lines, reference[0].raw
    assert "count=3,bytes=6" in lines, reference[0].raw
    assert f"{b}/a has a parent {b} which has a quota" in lines, reference[0].raw
    assert f"quota for {b} does not exist." in lines, reference[0].raw
