"""bench/policy_push.py as a smoke test: a policy change pushed to subscribed proxies.

Runs the benchmark small (20 control loops, a few rounds) on each store, real ZooKeeper
and real etcd, with a real ``zkgate serve``, ``zkgate proxy`` and Meta Server, and checks
what it found, not how fast: every control loop acknowledged every policy version and
every endpoint change (the run fails otherwise), the real proxy routed on each new split,
and the summary line has the format ``BENCHMARKS.md`` quotes.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.servers import REPO_ROOT


@pytest.mark.parametrize("store", ["zookeeper", "etcd"])
def test_the_policy_push_benchmark_runs_on_each_store(store: str) -> None:
    run = subprocess.run(
        [sys.executable, "bench/policy_push.py", "--proxies", "20", "--rounds", "3",
         "--warmup-rounds", "1", "--gap-ms", "10", "--store", store],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"policy_push: proxies=20 p99_ms=([\d.]+) endpoint_p99_ms=([\d.]+) store={store}", last
    )
    assert found, last
    assert float(found[1]) > 0 and float(found[2]) > 0
    seen = re.search(r"real proxy routes on it +p50 +([\d.]+) ms +max +([\d.]+) ms", run.stdout)
    assert seen, run.stdout
    # The proxy cannot route on a policy before it was written.
    assert 0 < float(seen[1]) <= float(seen[2])
    assert "3 timed rounds" in run.stdout
