"""A short, bounded run of every fuzz target (tests/fuzz/targets.py) from its seed corpus.

Each target runs in its own process for ``QUOTIENT_FUZZ_SECONDS`` (default 20 s; ``make fuzz``
sets 600) with libFuzzer's per-input timeout of 10 s and an RSS limit of 3 GB; a finding fails the
test with the input's path and the target's output. The run's figures are printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("QUOTIENT_FUZZ_SECONDS", "20"))
sys.path.insert(0, str(HERE))


@pytest.mark.parametrize("target", ["image", "molecule", "protobuf"])
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    from targets import seed

    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    seed(target, corpus)
    cmd = [
        sys.executable,
        str(HERE / "targets.py"),
        target,
        str(corpus),
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=3072",
        "-max_len=65536",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 180)
    output = run.stdout + run.stderr
    runs = re.search(r"Done (\d+) runs in (\d+) second", output)
    cov = re.findall(r"cov: (\d+)", output)
    found = sorted(p.name for p in artifacts.iterdir())
    print(
        f"\nfuzz {target}: {runs.group(1) if runs else '?'} inputs in "
        f"{runs.group(2) if runs else '?'} s, coverage {cov[-1] if cov else '?'} edges, "
        f"corpus {len(list(corpus.iterdir()))} inputs, findings {found}"
    )
    assert run.returncode == 0 and not found, f"finding {found}:\n{output[-6000:]}"
    assert runs and int(runs.group(1)) >= 100, f"the fuzzer hardly ran:\n{output[-3000:]}"
