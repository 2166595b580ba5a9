"""bench/gpu.sh's steps, dry-run on this machine (no GPU here; the device run is the real one):
bench/gpu_pack.py writes the inputs and model batches, bench/gpu.py checks every model and engine
against the CPU (here: ``--device cpu``, so every difference is exactly 0), skips the handler's
CUDA placement with its reason, and runs bench/serving.py from the packed inputs. This checks that
the script works before a session spends device time on it, not what it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_dry_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    pack, out = tmp_path / "pack", tmp_path / "out"
    packed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_pack.py"),
            "--out",
            str(pack),
            "--no-wheels",
            "--inputs",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "a device command carries" in packed.stdout
    assert sorted(p.name for p in (pack / "batches").iterdir()) == [
        "druglike-vae.npz",
        "qm9-vae.npz",
        "rotmnist-c8.npz",
    ]
    assert (pack / "python" / "quotient_client" / "proto" / "embedding_service_pb2.py").exists()
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--pack",
            str(pack),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--engines",
            "onnx",
            "--inputs",
            "64",
            "--warmup",
            "0.3",
            "--duration",
            "0.7",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["failed"] == 0
    checks = {(c["model"], c["engine"]): c for c in report["checks"]}
    assert set(checks) == {(m, "onnx") for m in ("rotmnist-c8", "qm9-vae", "druglike-vae")}
    for check in checks.values():
        assert check["status"] == "passed" and set(check["max_relative"].values()) == {0.0}
    assert report["handler"]["status"] == "skipped"
    bench = report["bench"]["onnx"]
    assert bench["status"] == "ran"
    served = bench["results"]["models"]
    assert set(served) == {"rotmnist-c8", "qm9-vae"}  # RDKit is here: SMILES are served
    assert served["rotmnist-c8"]["embedded"]["single"]["items_per_s"] > 0
