"""bench/zk_reads.py as a smoke test, in plain text and over TLS.

Runs the benchmark tiny (two connections, a fraction of a second per run) against a
real ZooKeeper 3.8 and a real ``zkgate serve``, and checks what it found, not how
fast: the load generator got replies from both servers (it fails the run on any
wrong or missing reply), a ``--tls`` run really spoke TLS 1.2 or 1.3 to each
server's TLS port, and the last line has the format ``BENCHMARKS.md`` quotes.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.servers import REPO_ROOT

_TINY = ["--duration", "0.5", "--warmup", "0.5", "--repeats", "1", "--connections", "2",
         "--window", "10", "--latency-requests", "50", "--latency-warmup", "10"]  # fmt: skip


def _run(*extra: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [sys.executable, "bench/zk_reads.py", *_TINY, *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _rates(found: re.Match[str]) -> tuple[float, float, float]:
    zkgate, zookeeper, ratio = float(found[1]), float(found[2]), float(found[3])
    assert zkgate > 0 and zookeeper > 0
    assert ratio == pytest.approx(zkgate / zookeeper, abs=0.01)
    return zkgate, zookeeper, ratio


def test_the_tls_run_reads_from_both_servers_over_tls() -> None:
    run = _run("--tls")
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"zk_reads_tls: zkgate=(\d+) zookeeper=(\d+) ratio=([\d.]+)", last)
    assert found, last
    _rates(found)
    # The same protocol and cipher suite on both servers, so that they do the
    # same cryptographic work and the ratio compares the servers, not the crypto.
    negotiated = re.search(
        r"over TLS, client certificates verified: (\w+) (TLSv1\.\d \S+), (\w+) (TLSv1\.\d \S+)$",
        run.stdout,
        re.MULTILINE,
    )
    assert negotiated, run.stdout
    assert {negotiated[1], negotiated[3]} == {"zookeeper", "zkgate"}
    assert negotiated[2] == negotiated[4] == "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"


def test_the_plain_run_keeps_its_summary_line() -> None:
    run = _run()
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"zk_reads: zkgate=(\d+) zookeeper=(\d+) ratio=([\d.]+) "
        r"p99_ms: zkgate=([\d.]+) zookeeper=([\d.]+)",
        last,
    )
    assert found, last
    _rates(found)
    assert "over TLS" not in run.stdout


def test_tls_refuses_server_addresses_with_a_usage_error() -> None:
    run = subprocess.run(
        [sys.executable, "bench/zk_reads.py", "--tls", "--zkgate-address", "127.0.0.1:1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--tls starts its own servers" in run.stderr
