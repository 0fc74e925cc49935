"""The fuzz targets of ``fuzz/``: every kept input replayed, and a short
coverage-guided run of each.

Each target states its parser's contract (only the parser's own error type
may escape; the admin endpoint always answers HTTP). The replay runs every
file of ``fuzz/corpus/<target>/`` (the seeds, written by
``fuzz/make_corpus.py``) and of ``fuzz/crashes/<target>/`` (every input that
ever crashed a target, kept as a regression test) through the target
in-process. The short runs start atheris in a subprocess with a fixed seed
and a fixed number of executions on a copy of the corpus, so they are
repeatable and never write into the repository; ``scripts/fuzz`` is the long
run.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import make_corpus

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = ("zk_server", "zk_client", "wire", "admin_http", "config")
#: Executions of each short run: a few seconds each on the 2-core machine
#: (the admin target is the slowest, a trio run per input).
RUNS = {"zk_server": 6000, "zk_client": 6000, "wire": 6000, "admin_http": 600, "config": 1500}


def _kept_inputs() -> Iterator[object]:
    for kind in ("corpus", "crashes"):
        for target in TARGETS:
            for path in sorted((FUZZ / kind / target).glob("*")):
                if path.name.startswith(".") or not path.is_file():
                    continue
                yield pytest.param(target, path, id=f"{kind}/{target}/{path.name}")


@pytest.mark.parametrize(("target", "path"), list(_kept_inputs()))
def test_kept_input_is_refused_or_accepted_cleanly(target: str, path: Path) -> None:
    module = importlib.import_module(f"fuzz.{target}")
    module.TestOneInput(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_seed_corpus_is_what_make_corpus_writes(target: str) -> None:
    """The committed seeds can be regenerated: none missing, none stale."""
    expected = dict(make_corpus.SEEDS[target]())
    folder = FUZZ / "corpus" / target
    assert len(expected) >= 5
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, f"{folder / name}: run fuzz/make_corpus.py"


@pytest.mark.parametrize("target", TARGETS)
def test_a_short_coverage_guided_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    assert importlib.util.find_spec("atheris") is not None, (
        "atheris is part of the test extra: .venv/bin/python -m pip install -e '.[test]'"
    )
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    command = [
        sys.executable, "-m", f"fuzz.{target}", f"-runs={RUNS[target]}", "-seed=1",
        "-timeout=20", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}; crashing inputs: {artifacts} "
        f"(keep them in fuzz/crashes/{target}/)\n{result.stderr[-4000:]}"
    )
    # libFuzzer stops at the first check past -runs, which can be a few
    # executions later (it said "Done 602 runs" for -runs=600 once).
    done = re.search(r"^Done (\d+) runs", result.stderr, re.MULTILINE)
    assert done is not None and int(done.group(1)) >= RUNS[target], result.stderr[-2000:]
