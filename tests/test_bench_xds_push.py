"""bench/xds_push.py as a smoke test: one etcd write pushed to xDS streams and to subscribers.

Runs the benchmark small (20 ADS streams, 20 subscribers of zkgate's own
protocol, a few rounds) against a real etcd and a real Envoy witness, and
checks what it found, not how fast: every stream and every subscriber got
every change (the run fails otherwise), each change was encoded once, to
exactly the bytes of the assignment the streams received, nothing was
rejected, and Envoy showed every change.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.servers import REPO_ROOT


def test_the_xds_push_benchmark_runs_and_encodes_each_change_once() -> None:
    run = subprocess.run(
        [sys.executable, "bench/xds_push.py", "--streams", "20", "--rounds", "4",
         "--warmup-rounds", "1", "--gap-ms", "10"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"xds_push: streams=20 p50_ms=([\d.]+) p99_ms=([\d.]+) own_protocol_p99_ms=([\d.]+) "
        r"bytes_encoded_per_change=([\d.]+) envoy_seen_ms=([\d.]+)",
        last,
    )
    assert found, last
    p50, p99 = float(found[1]), float(found[2])
    assert 0 < p50 <= p99
    encodings = re.search(
        r"xDS encodings per change: ([\d.]+) .* assignment received ([\d.]+) bytes \(mean\), "
        r"NACKs (\d+)",
        run.stdout,
    )
    assert encodings, run.stdout
    assert float(encodings[1]) == 1.0
    assert float(found[4]) == float(encodings[2])
    assert int(encodings[3]) == 0
