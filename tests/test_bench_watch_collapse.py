"""bench/watch_collapse.py as a smoke test: the mirror's watch collapse, end to end.

Runs the benchmark small (50 raw sessions, a few rounds, no read runs) against
real ZooKeeper 3.8 and a zkgate mirroring it, and checks what it found, not
how fast: the ensemble holds the same watches for one client as for fifty,
every session heard every change, and no re-read after an event showed older
data than the write that caused it.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.servers import REPO_ROOT


def test_the_watch_collapse_benchmark_runs_and_the_ensemble_sees_one_watch() -> None:
    run = subprocess.run(
        [sys.executable, "bench/watch_collapse.py", "--clients", "50", "--paths", "5",
         "--rounds", "5", "--warmup-rounds", "1", "--repeats", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"watch_collapse: clients=50 upstream_watches=(\d+) direct_watches=(\d+) "
        r"fanout_p99_ms: zkgate=[\d.]+ zookeeper=[\d.]+ mirror_read_ratio=n/a",
        last,
    )
    assert found, last
    upstream, direct = int(found[1]), int(found[2])
    assert direct == 50 * 5
    # One persistent recursive watch, which ZooKeeper 3.8 counts twice.
    assert upstream <= 2
    collapse = re.search(
        r"through zkgate: +(\d+) watches with 50 clients, (\d+) with 1 client", run.stdout
    )
    assert collapse, run.stdout
    assert int(collapse[1]) == int(collapse[2]) == upstream
    assert "re-arming reads returned older data" not in run.stdout
