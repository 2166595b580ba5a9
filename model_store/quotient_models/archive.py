"""Build a TorchServe archive (``NAME.mar``) from a model directory.

    python -m quotient_models.archive --model-dir model_store/models/NAME \\
        --export-path model_store/archives [--engine onnx|torch] [--device cpu|gpu]

Runs ``torch-model-archiver`` (the one next to this Python) with the engine's encoder as the
serialized file, ``model_store/handlers/quotient_handler.py`` as the handler, the model directory's
other serving files as extra files and a generated model-config YAML. The archive is written to a
private temporary directory and moved into place, so a failed or concurrent build never leaves a
half-written ``.mar``; rebuilding replaces it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quotient_models.runtime import ENGINES
from quotient_models.spec import ModelSpec

__all__ = ["ArchiveError", "ArchiveOptions", "build_archive", "default_handler", "main"]

# torch-model-archiver's rule for model names (TorchServe rejects others at registration).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# --extra-files is comma separated and globbed by the archiver.
_UNSAFE_PATH = re.compile(r"[,*?\[\]]")
_ENCODER_KEY = {"onnx": "onnx", "torch": "torchscript"}


class ArchiveError(RuntimeError):
    """The archive cannot be built; the message says why and what to do."""


@dataclass(frozen=True)
class ArchiveOptions:
    """Per-model settings written into the archive's model-config YAML."""

    engine: str = "onnx"
    device: str = "cpu"  # TorchServe's deviceType: "cpu" or "gpu"
    response_timeout_s: int = 120
    workers: int = 1
    threads: int = 0  # encoder threads per worker; 0 lets the engine decide


def default_handler() -> Path:
    """``model_store/handlers/quotient_handler.py`` next to this package."""
    return Path(__file__).resolve().parent.parent / "handlers" / "quotient_handler.py"


def _archiver() -> str:
    local = Path(sys.executable).parent / "torch-model-archiver"
    found = str(local) if local.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise ArchiveError(
            "torch-model-archiver not found next to "
            f"{sys.executable}; install requirements/torchserve.txt (make install)"
        )
    return found


def _model_config(options: ArchiveOptions) -> str:
    # batchSize stays 1: every request is already a model batch assembled by the service (with
    # batchSize 1 TorchServe never waits maxBatchDelay; 0 there would read as "unset" → 100 ms).
    return (
        f"minWorkers: {options.workers}\n"
        f"maxWorkers: {options.workers}\n"
        "batchSize: 1\n"
        f"responseTimeout: {options.response_timeout_s}\n"
        f"deviceType: {options.device}\n"
        "handler:\n"
        f"  engine: {options.engine}\n"
        f"  threads: {options.threads}\n"
    )


def _serving_files(spec: ModelSpec, engine: str) -> tuple[Path, list[Path]]:
    """(serialized encoder, extra files): everything model.json names that serving needs."""
    encoders = spec.raw.get("encoder", {})
    key = _ENCODER_KEY[engine]
    if key not in encoders:
        raise ArchiveError(
            f"{spec.directory}/model.json names no {key!r} encoder for engine {engine!r}"
        )
    serialized = spec.path("encoder", key)
    extras = [spec.directory / "model.json", spec.path("projection_head", "file")]
    extras += [spec.path("encoder", k) for k in _ENCODER_KEY.values() if k != key and k in encoders]
    # models that decode (molecules) also need their decoder, in every engine's form
    extras += [spec.path("decoder", k) for k in spec.raw.get("decoder", {})]
    extras += [
        spec.directory / spec.raw.get(k, d)
        for k, d in (("card", "MODEL_CARD.md"), ("metrics", "metrics.json"))
    ]
    required = [serialized, *extras[:2]]
    missing = [str(p) for p in required if not p.is_file()]
    if missing:
        raise ArchiveError(f"model {spec.name!r}: missing files {missing}")
    extras = [p for p in extras if p.is_file()]
    for p in [serialized, *extras]:
        if p.resolve().parent != spec.directory:
            raise ArchiveError(
                f"{p}: model files must lie directly in {spec.directory} (archives are flat)"
            )
        if _UNSAFE_PATH.search(str(p)):
            raise ArchiveError(f"{p}: torch-model-archiver cannot take paths with , * ? [ ]")
    return serialized, extras


def build_archive(
    model_dir: str | Path,
    export_path: str | Path,
    options: ArchiveOptions | None = None,
    handler: str | Path | None = None,
) -> Path:
    """Build ``export_path/<model name>.mar`` from ``model_dir`` and return its path."""
    options = options or ArchiveOptions()
    if options.engine not in ENGINES:
        raise ArchiveError(f"unknown engine {options.engine!r}; choose one of {ENGINES}")
    if options.device not in ("cpu", "gpu"):
        raise ArchiveError(f"unknown device type {options.device!r}; choose cpu or gpu")
    try:
        spec = ModelSpec.load(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ArchiveError(str(exc)) from None
    if not _NAME.match(spec.name):
        raise ArchiveError(
            f"model name {spec.name!r} is not a valid TorchServe model name "
            "(a letter first, then letters, digits, '_', '.', '-')"
        )
    handler_file = Path(handler) if handler else default_handler()
    if not handler_file.is_file():
        raise ArchiveError(f"handler {handler_file} not found")
    serialized, extras = _serving_files(spec, options.engine)
    export = Path(export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)
    target = export / f"{spec.name}.mar"

    # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps builds apart.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=export) as work:
        config = Path(work) / "model-config.yaml"
        config.write_text(_model_config(options))
        out = Path(work) / "out"
        out.mkdir()
        (Path(work) / "tmp").mkdir()
        cmd = [
            _archiver(),
            "--model-name", spec.name,
            "--version", spec.version,
            "--serialized-file", str(serialized),
            "--handler", str(handler_file.resolve()),
            "--extra-files", ",".join(str(p) for p in extras),
            "-c", str(config),
            "--export-path", str(out),
            "-f",
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(Path(work) / "tmp")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        built = out / f"{spec.name}.mar"
        if proc.returncode != 0 or not built.is_file():
            raise ArchiveError(
                f"torch-model-archiver failed for {spec.name} (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}".rstrip()
            )
        os.replace(built, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quotient_models.archive", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-dir", required=True, help="a model directory holding model.json")
    parser.add_argument("--export-path", required=True, help="where NAME.mar is written")
    parser.add_argument(
        "--engine", choices=ENGINES, default="onnx", help="encoder the handler runs"
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="TorchServe deviceType"
    )
    parser.add_argument("--response-timeout", type=int, default=120, help="seconds per model batch")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers for this model")
    parser.add_argument(
        "--threads", type=int, default=0, help="encoder threads per worker (0: engine default)"
    )
    parser.add_argument(
        "--handler",
        default=None,
        help="handler file (default: model_store/handlers/quotient_handler.py)",
    )
    args = parser.parse_args(argv)
    options = ArchiveOptions(
        args.engine, args.device, args.response_timeout, args.workers, args.threads
    )
    try:
        path = build_archive(args.model_dir, args.export_path, options, args.handler)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spec = ModelSpec.load(args.model_dir)
    size = path.stat().st_size / 1e6
    what = f"{spec.name} {spec.version}, engine {options.engine}, {options.device}"
    print(f"built {path} ({what}, {size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
