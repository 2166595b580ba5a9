"""The GPU checks and the GPU bench (issue 12, point 3), run by bench/gpu.sh on the lent device.

    make gpu-pack                    # here: .gpu/ (wheels, client stubs, inputs, batches)
    bash bench/gpu.sh                # there (carry .gpu): writes $OUT/gpu.json, serving-gpu-*.json

1. **Environment**: Python, torch and its CUDA, the GPU, ONNX Runtime's providers, RDKit.
2. **CUDA = CPU**: for each model's batch in ``.gpu/batches`` and each engine (TorchScript,
   ONNX Runtime), every projection embedded on ``cuda`` and on ``cpu`` by ``load_model``; the
   largest per-row relative difference must be at most ``--tolerance`` (1e-4). An engine that
   cannot run on CUDA there (ONNX Runtime without its CUDA provider) is *skipped* with its reason,
   not passed.
3. **TorchServe placement**: the handler given ``gpu_id`` 0 loads on ``cuda:0`` and answers a
   batch as the CPU does (TorchServe itself does not run there: its ``ts`` package and Java are
   absent, so the handler's two base classes are stood in for when ``ts`` is missing, and the
   result says so).
4. **Bench**: bench/serving.py with ``--device cuda`` for each engine that passed 2: raw model
   vs the service (embedded; decoding in processes), every request shape, memory. Molecules
   need RDKit to turn SMILES into graphs; without it only rotmnist-c8 is served there.

Exit status 1 when a check fails; the JSON says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("torch", "onnx")


def _log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError as exc:
        env["torch"] = f"missing: {exc}"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as exc:
        env["onnxruntime"] = f"missing: {exc}"
    env["rdkit"] = importlib.util.find_spec("rdkit") is not None
    env["numpy"] = np.__version__
    return env


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row ‖a − b‖ / ‖a‖."""
    from quotient_models.invariance import relative_change

    return float(np.max(relative_change(a, b)))


def check_model(
    model: str,
    batch: dict[str, np.ndarray],
    tolerance: float,
    device: str = "cuda",
    engines: tuple[str, ...] = ENGINES,
) -> list[dict]:
    """``device`` (CUDA) against CPU for one model, per engine and projection."""
    from quotient_models import serving
    from quotient_models.errors import DeviceUnavailable, MissingRuntime
    from quotient_models.runtime import load_model

    directory = ROOT / "model_store" / "models" / model
    rows = []
    for engine in engines:
        row: dict[str, Any] = {"model": model, "engine": engine}
        try:
            cpu = load_model(directory, engine, "cpu")
            cuda = load_model(directory, engine, device)
        except (DeviceUnavailable, MissingRuntime) as exc:
            rows.append({**row, "status": "skipped", "reason": str(exc)})
            _log(f"{model} {engine}: skipped: {exc}")
            continue
        except Exception as exc:  # a load that fails on the device is a finding, not a crash
            rows.append({**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
            _log(f"{model} {engine}: FAILED to load: {exc}")
            continue
        worst: dict[str, float] = {}
        for projection in [p.name for p in cpu.projections()]:
            want = serving.embed_arrays(cpu, batch, projection).values
            serving.embed_arrays(cuda, batch, projection)  # first call: kernels, JIT profiling
            start = time.perf_counter()
            got = serving.embed_arrays(cuda, batch, projection).values
            worst[projection] = relative(want, got)
            _log(
                f"{model} {engine} {projection}: max relative {worst[projection]:.2e} "
                f"({(time.perf_counter() - start) * 1000:.1f} ms for {len(got)} on {device})"
            )
        ok = max(worst.values()) <= tolerance
        rows.append(
            {
                **row,
                "status": "passed" if ok else "failed",
                "max_relative": worst,
                "tolerance": tolerance,
            }
        )
    return rows


def _stand_in_ts() -> bool:
    """Make ``ts.torch_handler.base_handler.BaseHandler`` and ``ts.utils.util
    .PredictionException`` importable where TorchServe is not installed; True if it was not."""
    if importlib.util.find_spec("ts") is not None:
        return False

    class PredictionException(Exception):
        def __init__(self, message: str, error_code: int = 500) -> None:
            super().__init__(message)
            self.error_code = error_code

    names = {
        "ts": {},
        "ts.torch_handler": {},
        "ts.torch_handler.base_handler": {"BaseHandler": object},
        "ts.utils": {},
        "ts.utils.util": {"PredictionException": PredictionException},
    }
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    return True


def check_handler(model: str, batch: dict[str, np.ndarray], tolerance: float) -> dict:
    """The TorchServe handler given ``gpu_id`` 0 loads on cuda:0 and answers as the CPU does."""
    from quotient_models import serving

    stood_in = _stand_in_ts()
    spec = importlib.util.spec_from_file_location(
        "quotient_handler", ROOT / "model_store" / "handlers" / "quotient_handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = ROOT / "model_store" / "models" / model
    answers, devices = [], []
    for gpu_id in (None, 0):
        handler = module.QuotientHandler()
        handler.initialize(
            SimpleNamespace(
                system_properties={"model_dir": str(directory), "gpu_id": gpu_id},
                model_yaml_config={"handler": {"engine": "torch"}},
            )
        )
        devices.append(handler.device)
        payload = serving.encode_batch(batch, handler.model.resolve_projection(None))
        body = handler.postprocess(handler.inference(handler.preprocess([{"body": payload}])))
        answers.append(serving.decode_output(body[0]).values)
    difference = relative(answers[0], answers[1])
    ok = devices == ["cpu", "cuda:0"] and difference <= tolerance
    result = {
        "model": model,
        "devices": devices,
        "max_relative": difference,
        "status": "passed" if ok else "failed",
        "ts_stood_in": stood_in,
    }
    _log(f"handler {model}: {devices}, max relative {difference:.2e}: {result['status']}")
    return result


def bench(engine: str, models: list[str], out: Path, args: argparse.Namespace) -> dict:
    """bench/serving.py on ``args.device``; its JSON, or the reason it has none."""
    path = out / f"serving-gpu-{engine}.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "serving.py"),
        "--device",
        args.device,
        "--engine",
        engine,
        "--no-torchserve",
        "--models",
        ",".join(models),
        "--serve",
        ",".join(models),
        "--inputs-from",
        str(args.pack / "inputs"),
        "--inputs",
        str(args.inputs),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
        "--out",
        str(path),
    ]
    _log(f"bench ({engine}): {' '.join(command[1:])}")
    try:
        run = subprocess.run(command, timeout=args.bench_timeout, text=True, capture_output=True)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"over {args.bench_timeout} s"}
    sys.stderr.write(run.stderr[-6000:])
    print(run.stdout)
    if run.returncode != 0:
        return {"status": "failed", "reason": run.stderr[-2000:]}
    return {"status": "ran", "results": json.loads(path.read_text()), "table": run.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--bench-timeout", type=float, default=200.0, help="seconds per engine")
    parser.add_argument("--no-bench", dest="bench", action="store_false")
    parser.add_argument(
        "--device",
        default="cuda",
        help="device checked against the CPU (cpu: a dry run of every step, on any machine)",
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="engines checked, benched")
    args = parser.parse_args()
    engines = tuple(e for e in args.engines.split(",") if e)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report: dict[str, Any] = {"date": started, "environment": environment(), "checks": []}
    _log(json.dumps(report["environment"]))
    batches = {}
    for path in sorted((args.pack / "batches").glob("*.npz")):
        with np.load(path) as f:
            batches[path.stem] = {k: f[k] for k in f.files}
    if not batches:
        raise SystemExit(f"no batches under {args.pack / 'batches'}: run make gpu-pack here first")
    for model, batch in batches.items():
        report["checks"] += check_model(model, batch, args.tolerance, args.device, engines)
    if not report["environment"].get("cuda_available"):
        report["handler"] = {"status": "skipped", "reason": "torch sees no CUDA device"}
    elif "rotmnist-c8" in batches:
        report["handler"] = check_handler("rotmnist-c8", batches["rotmnist-c8"], args.tolerance)
    if args.bench:
        models = ["rotmnist-c8"]
        if report["environment"]["rdkit"]:
            models.append("qm9-vae")
        else:
            report["bench_note"] = (
                "qm9-vae not served: RDKit is not installed on the device and its wheel does not "
                "fit beside the working tree in one command's carry"
            )
        passed = {
            c["engine"]
            for c in report["checks"]
            if c["model"] == "rotmnist-c8" and c["status"] == "passed"
        }
        report["bench"] = {e: bench(e, models, args.out, args) for e in engines if e in passed}
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    if report.get("handler", {}).get("status") == "failed":
        failed.append(report["handler"])
    failed += [
        {"bench": e, **b} for e, b in report.get("bench", {}).items() if b["status"] == "failed"
    ]
    report["failed"] = len(failed)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    for c in report["checks"]:
        worst = max(c["max_relative"].values()) if "max_relative" in c else None
        figure = f"max relative {worst:.2e}" if worst is not None else c.get("reason", "")[:120]
        print(f"{c['model']:<14} {c['engine']:<6} {c['status']:<8} {figure}")
    _log(f"wrote {args.out / 'gpu.json'}; {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
