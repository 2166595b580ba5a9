"""`make bench-serving` runs end to end: bench/serving.py starts the service (embedded, decoding
in processes, TorchServe backend) and a plain TorchServe, drives every request shape through its
load generator (which parses answers and checks their row counts), measures the bare gRPC floor,
memory per model and a few seconds of soak, and writes its JSON and the soak plot. A short run
on one model: this checks that the benchmark works, not what it measures (figures are not
asserted; speed targets are the benchmark's, never a test's)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from serving import PLAIN, SERVICES, SHAPES  # noqa: E402


def test_the_serving_benchmark_runs_and_writes_every_shape(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serving.py"),
            "--out",
            str(out),
            "--models",
            "rotmnist-c8",
            "--inputs",
            "64",
            "--warmup",
            "0.5",
            "--duration",
            "1",
            "--check-every",
            "1",
            "--soak",
            "6",
            "--soak-window",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    model = result["models"]["rotmnist-c8"]
    assert model["raw"]["items_per_s"] > 0 and model["raw"]["idle"]["requests"] > 0
    for service, shape in itertools.product([*SERVICES, PLAIN], SHAPES):
        measured, per_request = model[service][shape], SHAPES[shape][0]
        assert measured["errors"] == []
        assert measured["items_per_request"] == per_request
        assert measured["answers_checked"] > 0  # every answer parsed: rows == items sent
        assert measured["items_per_s"] > 0
        assert measured["service_peak_rss_mb"] > 0
    for shape in ("single", "large"):
        assert model["torchserve backend"][shape]["ratio_to_plain_torchserve"] > 0
    floor = model["grpc floor"]  # the bare gRPC server answered every call, rows checked
    assert floor["calls_per_s"] > 0 and model["raw"]["cpu_ms_per_item"] > 0
    assert floor["server_cpu_ms_per_call"] > 0 and floor["client_cpu_ms_per_call"] > 0
    here, elsewhere = (floor[f"single_ceiling{k}_ratio_to_raw"] for k in ("", "_server_only"))
    assert 0 < here < elsewhere
    raw_rss, memory = model["raw"]["rss_mb"], model["memory"]
    assert raw_rss["loaded"] > raw_rss["before_load"] > 0
    assert memory["peak_rss_mb"] >= memory["ready_rss_mb"] > 0
    soak = result["soak"]  # both shapes at once on one service, memory sampled each second
    assert soak["models"] == ["rotmnist-c8"] and len(soak["timeline"]) >= 4
    assert all(soak["shapes"][shape]["items_per_s"] > 0 for shape in ("single", "large"))
    assert soak["rss_max_mb"] >= max(soak["rss_first_mb"], soak["rss_last_mb"])
    assert (out.parent / "soak.png").stat().st_size > 0
    assert "| rotmnist-c8 |" in run.stdout and "Soak, " in run.stdout  # the tables
    assert "gRPC floor" in run.stdout
