"""Prepare what bench/gpu.sh needs on the lent GPU machine, which has no network: ``.gpu/``.

    make gpu-pack      # then, on the device: bash bench/gpu.sh (carry: .gpu)

That machine has Python 3.12 with torch (CUDA), onnxruntime, numpy, grpcio, Pillow and psutil
but none of this repository's packages; what travels with a command is the working tree and at
most 64 MiB in all. ``.gpu/`` (ignored by git) holds:

- ``wheels/``: CPython 3.12 manylinux wheels of the gRPC and protobuf packages the service
  imports, at the versions installed here (the generated stubs check them);
- ``python/quotient_client/``: the installed client package, with its generated gRPC stubs;
- ``inputs/<model>.npz``: client inputs for bench/serving.py's ``--inputs-from`` (PNG files of
  MNIST test digits, QM9 test SMILES);
- ``batches/<model>.npz``: one collated model batch per model (what the service hands a
  backend; MOSES test molecules for druglike-vae), for the CUDA-vs-CPU check: the device needs
  no RDKit to embed molecules from it.

RDKit (its wheel is 32 MB) does not travel: the tree alone is 54 MB. Without it the device
embeds molecule batches prepared here but cannot serve SMILES; bench/gpu.py says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serving import client_inputs, prepared_items  # noqa: E402

LIMIT = 64 << 20  # what one device command may carry, the working tree included
WHEELS = [  # imported by the service and its generated stubs, absent or older there
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
    "googleapis-common-protos",
    "protobuf",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
BENCH_MODELS = ("rotmnist-c8", "qm9-vae")
CHECK_MODELS = ("rotmnist-c8", "qm9-vae", "druglike-vae")
BATCH = 64


def tree_bytes() -> int:
    """Bytes of what a device command carries besides ``.gpu``: tracked files, and untracked
    files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(out),
            *pins,
        ],
        check=True,
    )


def model_batch(model: str, inputs: list[bytes]) -> dict[str, np.ndarray]:
    """The first ``BATCH`` inputs prepared and collated as the service would hand them over."""
    loaded, prepared = prepared_items(model, inputs[:BATCH])
    return loaded.collate(prepared)


def druglike_inputs() -> list[bytes]:
    """The first MOSES test molecules (PyPI molsets)."""
    from quotient_models.molecules.moses import read_smiles

    return [s.encode() for s in read_smiles("test")[:BATCH]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--inputs", type=int, default=2048, help="client inputs per model")
    parser.add_argument(
        "--no-wheels",
        dest="wheels",
        action="store_false",
        help="no wheels (a dry run here: bench/gpu.py --device cpu)",
    )
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    if args.wheels:
        download_wheels(args.out / "wheels")
    import quotient_client

    client = Path(quotient_client.__file__).parent
    shutil.copytree(
        client,
        args.out / "python" / "quotient_client",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (args.out / "inputs").mkdir()
    (args.out / "batches").mkdir()
    for model in CHECK_MODELS:
        inputs = druglike_inputs() if model == "druglike-vae" else client_inputs(model, args.inputs)
        if model in BENCH_MODELS:
            ends = np.cumsum([len(x) for x in inputs])
            data = np.frombuffer(b"".join(inputs), dtype=np.uint8)
            np.savez(args.out / "inputs" / f"{model}.npz", data=data, ends=ends)
        np.savez(args.out / "batches" / f"{model}.npz", **model_batch(model, inputs))
    pack, tree = folder_bytes(args.out), tree_bytes()
    total = pack + tree
    print(
        f"wrote {args.out}: {pack / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB)"
        f" a device command carries {total / 2**20:.1f} MiB of at most {LIMIT / 2**20:.0f}"
    )
    if total > LIMIT:
        raise SystemExit("too large for the device: carry fewer inputs (--inputs)")


if __name__ == "__main__":
    main()
