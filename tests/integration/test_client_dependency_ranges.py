"""The client's declared dependency ranges hold at both ends: its wheel, built once, is installed
into two fresh virtual environments, one with the lowest versions clients/python/pyproject.toml
allows (protobuf, grpcio, grpcio-status, googleapis-common-protos, numpy, Pillow, tqdm), one
with the newest releases tested, and each makes real calls against the test server (embed an
image, describe a model, a bad item's error with its status details, the asyncio client).

The environments are kept under build/dependency-ranges/, keyed by their versions (the first
run installs them from PyPI, about a minute; later runs only reinstall the wheel)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "dependency-ranges"
PACKAGES = (
    "protobuf",
    "grpcio",
    "grpcio-status",
    "googleapis-common-protos",
    "numpy",
    "pillow",
    "tqdm",
)
# The newest releases tested (on PyPI when this was written); numpy, Pillow and tqdm as pinned
# for the repository's own environment.
NEWEST = {
    "protobuf": "7.36.2",
    "grpcio": "1.85.3",
    "grpcio-status": "1.85.3",
    "googleapis-common-protos": "1.76.0",
}

PROBE = r"""
import asyncio, json, sys
from importlib.metadata import version

import numpy as np

import quotient_client as qc

target = sys.argv[1]
digit = np.zeros((28, 28), np.uint8)
digit[6:22, 12:16] = 255
with qc.Client(target, retries=0) as client:
    vectors = client.embed_images([digit, np.rot90(digit)])
    assert vectors.shape == (2, 256) and float(np.abs(vectors[0] - vectors[1]).max()) < 1e-3
    info = client.get_model("rotmnist-c8")
    assert info.default_projection == "maxfilter" and info.metrics, info
    try:
        client.embed_images([digit, b"junk"])
    except qc.InvalidInputError as err:  # decoded from the status details
        assert (err.index, err.reason) == (1, "INVALID_INPUT"), (err.index, err.reason)
    else:
        raise AssertionError("junk was embedded")


async def main():
    async with qc.AsyncClient(target) as client:
        embedded = await client.embed([digit], model="rotmnist-c8")
        assert embedded.vectors.shape == (1, 256) and embedded.spec.version == info.version


asyncio.run(main())
print(json.dumps({p: version(p) for p in sys.argv[2:]}))
"""


def _floors() -> dict[str, str]:
    """The lower bound of each of PACKAGES in the client's pyproject.toml."""
    text = (REPO / "clients" / "python" / "pyproject.toml").read_text()
    floors = {}
    for name in PACKAGES:
        found = re.search(rf'^\s*"{re.escape(name)}>=([0-9.]+)', text, re.MULTILINE)
        assert found, f"pyproject.toml declares no floor for {name}"
        floors[name] = found.group(1)
    return floors


def _pinned(name: str) -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    found = re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert found, f"requirements/constraints.txt pins no {name}"
    return found.group(1)


def _environment(versions: dict[str, str], wheel: Path) -> Path:
    """A virtual environment with exactly ``versions`` and the client's wheel (reinstalled)."""
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    root = CACHE / key
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    done = root / "installed.json"
    if not done.is_file() or json.loads(done.read_text()) != versions:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", "--without-pip", str(root)], check=True
        )
        pins = [f"{name}=={v}" for name, v in versions.items()]
        subprocess.run([*pip, "install", "-q", *pins, str(wheel)], check=True, capture_output=True)
        done.write_text(json.dumps(versions))
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
         str(REPO / "clients" / "python")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("quotient_client-*.whl")
    return built


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any]) -> Any:
    return start_service()


@pytest.mark.parametrize("end", ["lowest", "newest"])
def test_the_client_works_at_both_ends_of_its_ranges(end: str, wheel: Path, service: Any) -> None:
    versions = _floors()
    if end == "newest":
        versions = {**{p: _pinned(p) for p in ("numpy", "pillow", "tqdm")}, **NEWEST}
    python = _environment(versions, wheel)
    probe = subprocess.run(
        [str(python), "-c", PROBE, service.target, *versions],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=CACHE,  # not the repository: nothing of it on the path
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    installed = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {p: installed[p] for p in versions} == {p: _normalised(v) for p, v in versions.items()}


def _normalised(version: str) -> str:
    """pip's "pillow==10" installs 10.0.0."""
    return version if version.count(".") >= 2 else version + ".0" * (2 - version.count("."))
