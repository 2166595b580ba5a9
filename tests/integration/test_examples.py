"""The scripts of examples/, run as a user runs them (``python examples/NAME.py --target ...``,
subprocesses) against a real in-process server of the committed models (rotmnist-c8, qm9-vae),
on a folder of 200 real MNIST test digits written by ``examples/make_digit_folder.py``. Each
test checks the exit status, what the script prints, and what it leaves behind (the index
folders, the PNG plot, the pickled pipeline), reopened here."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from quotient_client import Client
from quotient_client.stores import open_store

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MNIST = REPO / "data" / "mnist" / "mnist10k.npz"
N_DIGITS = 200
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="data/mnist absent: make data-images")


def load(name: str) -> ModuleType:
    """An example script as a module (for its constants and helpers)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """``python examples/SCRIPT ARGS`` in ``cwd`` → the finished process (output as text)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUOTIENT_")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, cwd=cwd, env={**clean, **(env or {})}, timeout=240,
    )  # fmt: skip


def ok(done: Any) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return str(done.stdout)


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any]) -> Any:
    return start_service()  # the committed model store


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples") / "digits"
    printed = ok(
        run("make_digit_folder.py", "--out", str(out), "--n", str(N_DIGITS), cwd=out.parent)
    )
    assert f"wrote {N_DIGITS} test digits" in printed
    return out


def test_make_digit_folder_writes_test_digits_under_their_labels(digit_folder: Path) -> None:
    from PIL import Image

    with np.load(MNIST) as f:
        test = f["split"] == 2  # train, val, test
        images, labels = f["images"][test], f["labels"][test]
    paths = sorted(digit_folder.glob("*/*.png"))
    assert len(paths) == N_DIGITS and len({p.parent.name for p in paths}) == 10
    for path in paths:
        index = int(path.stem)
        assert path.parent.name == str(labels[index]), path
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[index])
    bad = run("make_digit_folder.py", "--out", str(digit_folder), "--n", "0", cwd=digit_folder)
    assert bad.returncode == 2 and "--n must be between 1 and 1000" in bad.stderr


def test_molecule_search_finds_renumbered_molecules_at_rank_1(service: Any, tmp_path: Path) -> None:
    chem = pytest.importorskip("rdkit.Chem")
    example = load("molecule_search")
    library = example.read_library(example.LIBRARY)
    smiles = {e.name: e.smiles for e in library}
    for query, name in example.QUERIES:  # each query is its molecule, written differently
        assert query != smiles[name] and chem.CanonSmiles(query) == chem.CanonSmiles(smiles[name])
    lines = [ln for ln in example.LIBRARY.read_text().splitlines() if ln.strip()]
    assert len(library) == len([ln for ln in lines if not ln.startswith("#")]) >= 50

    index = tmp_path / "library.index"
    printed = ok(run("molecule_search.py", "--target", service.target, "--index", str(index),
                     "-k", "3", cwd=tmp_path))  # fmt: skip
    n = len(example.QUERIES)
    assert f"indexed {len(library)} molecules" in printed  # every line of the library embeds
    assert f"found their molecule at rank 1: {n}/{n}" in printed
    firsts = re.findall(r"^query (\S+).*\n +1\. (\S+) +(\S+)", printed, flags=re.M)
    assert [(q, hit) for q, hit, _ in firsts] == example.QUERIES

    with open_store(index) as store, Client(service.target) as client:  # the folder persisted
        query = client.embed(["C(O)C"], model="qm9-vae")  # ethanol, once more renumbered
        assert len(store) == len(library) and store.spec == query.spec
        ethanol = store.get(["ethanol"])[0]
        assert ethanol is not None and ethanol.metadata == {"smiles": "CCO", "line": 5}
        unit = [v / np.linalg.norm(v) for v in (ethanol.vector, query.vectors[0])]
        np.testing.assert_allclose(unit[0], unit[1], atol=1e-5)  # invariant to the numbering
        assert store.search(query, k=1)[0][0].id == "ethanol"


def test_molecule_search_reports_a_bad_line_and_takes_queries(service: Any, tmp_path: Path) -> None:
    library = tmp_path / "mine.smi"
    library.write_text("CCO ethanol\nCC(C)O\nc1ccccc1 benzene\n")
    printed = ok(run("molecule_search.py", "--target", service.target, "--library", str(library),
                     "--query", "OC(C)C", "-k", "2", cwd=tmp_path))  # fmt: skip
    assert re.search(r"query OC\(C\)C\n +1\. mine\.smi:2 ", printed), printed  # FILE:LINE as id
    assert "rank 1" not in printed  # no expectations for the caller's own queries

    library.write_text("CCO ethanol\nC[Si](C)(C)C tetramethylsilane\n")
    bad = run("molecule_search.py", "--target", service.target, "--library", str(library),
              cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert f"{library}:2 (tetramethylsilane):" in bad.stderr and "Si" in bad.stderr


def test_image_retrieval_finds_the_rotated_originals(
    service: Any, digit_folder: Path, tmp_path: Path
) -> None:
    queries = [sorted(digit_folder.glob(f"{label}/*.png"))[0] for label in ("2", "7")]
    index = tmp_path / "images.index"
    args = ["--folder", str(digit_folder), "--index", str(index), "--angle", "137", "-k", "4"]
    printed = ok(run("image_retrieval.py", *args, *[f"--query={q}" for q in queries],
                     cwd=tmp_path, env={"QUOTIENT_TARGET": service.target}))  # fmt: skip
    with open_store(index) as store:
        assert store.spec is not None
        metric = store.spec.metric
    described = {"l2": "Euclidean distance", "cosine": "cosine similarity"}[metric]
    assert f"indexed {N_DIGITS} images" in printed and described in printed
    assert printed.count("the original is at rank 1") == 2
    blocks = re.findall(r"turned by 137 degrees\n((?: +\d\. \S+ +\S+.*\n)+)", printed)
    hits = [re.findall(r" +\d\. (\S+) +(\S+)", block) for block in blocks]
    assert [h[0][0] for h in hits] == [q.relative_to(digit_folder).as_posix() for q in queries]
    for ranked in hits:
        scores = [float(score) for _, score in ranked]
        assert len(scores) == 4 and scores == sorted(scores, reverse=metric == "cosine")
        if metric == "cosine":
            assert 0.9 < scores[0] <= 1.0 + 1e-6
        else:  # the rotated original is much nearer than the next digit
            assert scores[0] < 0.6 * scores[1], scores
    with open_store(index) as store:
        assert len(store) == N_DIGITS and store.spec is not None
        assert store.spec.model == "rotmnist-c8"
        record = store.get([queries[1].relative_to(digit_folder).as_posix()])[0]
        assert record is not None and record.metadata == {"label": "7"}


def test_cluster_digits_writes_a_plot_and_beats_pixels(
    service: Any, digit_folder: Path, tmp_path: Path
) -> None:
    from PIL import Image

    plot = tmp_path / "clusters.png"
    printed = ok(run("cluster_digits.py", "--target", service.target, "--folder",
                     str(digit_folder), "--rotate", "--plot", str(plot), cwd=tmp_path))  # fmt: skip
    ari = float(re.search(r"ARI against the folder labels: (-?[\d.]+)", printed)[1])  # type: ignore[index]
    pixels = float(re.search(r"on the raw pixels: (-?[\d.]+)", printed)[1])  # type: ignore[index]
    sizes = re.search(r"cluster sizes \[([\d, ]+)\]", printed)[1]  # type: ignore[index]
    assert sum(int(s) for s in sizes.split(",")) == N_DIGITS and len(sizes.split(",")) == 10
    # measured 0.169 vs 0.078: rotation scatters the pixels, not the invariant embeddings
    assert ari > 0.1 and ari > pixels + 0.04, printed
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1600, 900)
        rgb = np.asarray(image.convert("RGB"))
    inked = (rgb < 200).any(axis=2).mean()  # not a blank canvas: text, heat map, digits
    colours = len(np.unique(rgb.reshape(-1, 3) // 32, axis=0))  # the clusters' colours
    assert 0.05 < inked < 0.6 and colours >= 10, (inked, colours)


def test_sklearn_pipeline_classifies_rotated_digits_and_pickles(
    service: Any, digit_folder: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "pipeline.pkl"
    printed = ok(run("sklearn_pipeline.py", "--target", service.target, "--folder",
                     str(digit_folder), "--save", str(saved), cwd=tmp_path))  # fmt: skip
    rotated = float(re.search(r"the same, randomly rotated: +([\d.]+)", printed)[1])  # type: ignore[index]
    pixels = float(re.search(r"\(baseline\): ([\d.]+)", printed)[1])  # type: ignore[index]
    assert "trained on 140 upright images, 10 labels" in printed
    assert rotated > 0.6 and rotated > pixels + 0.2, printed  # measured 0.733 vs 0.333
    assert "same predictions: True" in printed

    pipe = pickle.loads(saved.read_bytes())  # no channel inside: it connects on first use
    embedder = pipe.named_steps["embed"]
    assert "_client" not in embedder.__dict__ and embedder.spec_.model == "rotmnist-c8"
    digits = sorted(digit_folder.glob("*/*.png"))[:20]
    predicted = pipe.predict([str(p) for p in digits])
    assert np.mean(predicted == np.array([p.parent.name for p in digits])) > 0.5
    embedder.close()
