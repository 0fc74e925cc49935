"""bench/mesh_switch.py as a smoke test: a mesh switch and the automatic rollback reaching
consumer sessions, end to end.

Runs the benchmark small (30 sessions in 10 applications, a few rounds) against real
ZooKeeper 3.8 and a zkgate child process, and checks what it found, not how fast: every
session whose application was switched heard one watch event and re-read the new
providers (the benchmark fails otherwise), the injected outcome reports rolled every
switched-on application back (off, locked, with the rule's reason: the benchmark checks
the mesh document) and their sessions read the true providers again, no other session
heard anything, and zkgate's own count of view events is the number of affected sessions.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

from tests.servers import REPO_ROOT


def test_the_mesh_switch_benchmark_runs_and_wakes_only_the_affected_sessions() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.mesh_switch", "--sessions", "30", "--applications", "10",
         "--rounds", "3", "--warmup-rounds", "1", "--gap-ms", "10", "--rollback-rounds", "2",
         "--rollback-warmup-rounds", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"mesh_switch: sessions=30 switch_p99_ms=([\d.]+) rollback_p99_ms=([\d.]+) "
        r"unaffected_events=(\d+)",
        last,
    )
    assert found, last
    assert math.isfinite(float(found[1])) and math.isfinite(float(found[2]))
    assert int(found[3]) == 0
    # 10 applications of 3 sessions: half on (15 sessions), then those at another ratio
    # plus one more application (18), then all off (18), then half on again (15).
    rounds = re.findall(r"^  round (\d+): (\d+) affected", run.stdout, re.MULTILINE)
    assert [int(affected) for _, affected in rounds] == [18, 18, 15]
    # Each rollback round rolls back the 5 applications switched on (15 sessions).
    rollbacks = re.findall(r"^  rollback round (\d+): (\d+) affected", run.stdout, re.MULTILINE)
    assert [int(affected) for _, affected in rollbacks] == [15, 15]
    # The switch rounds' 66 events; the first rollback round finds half on already (the
    # last switch round's document), the second switches those 15 sessions on again; both
    # send the 15 back.
    counted = re.search(r"zkgate counted (\d+) view events", run.stdout)
    assert counted and int(counted[1]) == 15 + 18 + 18 + 15 + 15 + 15 + 15
