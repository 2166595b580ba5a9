"""The ``quotient`` command line, run as the installed program against a real server and real
stores: embed to .npy/.parquet, index add / search (FAISS folder, PostgreSQL+pgvector, Milvus),
ids, bad items with file and line, --json output, target and key from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import encode_png

from quotient_client import Client
from quotient_client.export import load_embeddings
from quotient_client.stores import higher_is_better

QUOTIENT = Path(sys.executable).parent / "quotient"
IMAGE, MOLECULE = "rotmnist-c8", "qm9-vae"
KEY = "cli-test-key-0123456789abcdef"
LIBRARY = """SMILES Name
CCO ethanol
OCC(O)CO glycerol
CC(=O)O acetic_acid
c1ccccc1 benzene
CC(C)=O acetone
NCC(=O)O glycine
C1CCOC1 thf
CCN(CC)CC triethylamine
"""


@pytest.fixture(scope="module")
def service(start_service, tmp_path_factory):
    keys = tmp_path_factory.mktemp("cli-keys") / "keys"
    keys.write_text(KEY + "\n")
    return start_service(api_key_file=str(keys))


def quotient(service, *args: str, env: dict[str, str] | None = None, check: int | None = 0):
    """Run the installed ``quotient`` with the target and key in its environment."""
    full = {**os.environ, "QUOTIENT_TARGET": service.target, "QUOTIENT_API_KEY": KEY, **(env or {})}
    done = subprocess.run(
        [str(QUOTIENT), *args], capture_output=True, text=True, env=full, timeout=240
    )
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, digits) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    (folder / "more").mkdir()
    for k in range(6):
        where = folder / ("more" if k >= 4 else "") / f"d{k}.png"
        where.write_bytes(encode_png(digits(k)))
    return folder


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("library") / "library.smi"
    path.write_text(LIBRARY)
    return path


def test_embed_a_folder_of_images_to_npy_with_paths_as_ids(service, digit_folder, tmp_path):
    out = tmp_path / "digits.npy"
    done = quotient(service, "embed", "--model", IMAGE, str(digit_folder), "-o", str(out))
    assert "embedded 6 items" in done.stderr
    ids, embeddings, _ = load_embeddings(out)
    assert ids[0] == str(digit_folder / "d0.png") and ids[-1] == str(digit_folder / "more/d5.png")
    with Client(service.target, api_key=KEY) as client:
        expected = client.embed_images([Path(i) for i in ids], model=IMAGE)
    np.testing.assert_allclose(embeddings.vectors, expected, rtol=1e-6, atol=1e-7)
    assert embeddings.spec.model == IMAGE and embeddings.spec.version


def test_molecules_to_parquet_with_names_file_lines_and_literals(service, library, tmp_path):
    unnamed = tmp_path / "unnamed.smi"
    unnamed.write_text("CC\nCCC\n")
    out = tmp_path / "mols.parquet"
    quotient(
        service,
        "embed",
        "--model",
        MOLECULE,
        str(library),
        str(unnamed),
        "--smiles",
        "CN",
        "-o",
        str(out),
    )
    ids, embeddings, metadata = load_embeddings(out)
    assert ids[:2] == ["ethanol", "glycerol"]
    assert ids[-3:] == [f"{unnamed}:1", f"{unnamed}:2", "CN"]
    assert len(embeddings) == 11 and metadata[0]["smiles"] == "CCO"


def test_a_bad_item_stops_with_its_file_and_line_or_is_skipped(service, tmp_path):
    bad = tmp_path / "bad.smi"
    bad.write_text("CCO ok\nC1CC broken_ring\nCCCCCCCCCCCC too_big\nCCN fine\n")
    out = tmp_path / "out.npy"
    failed = quotient(service, "embed", "--model", MOLECULE, str(bad), "-o", str(out), check=2)
    assert f"{bad}:2:" in failed.stderr and "--on-error skip" in failed.stderr
    assert not out.exists()
    skipped = quotient(
        service, "--on-error", "skip", "embed", "--model", MOLECULE, str(bad), "-o", str(out)
    )
    assert f"skipped {bad}:2:" in skipped.stderr and f"skipped {bad}:3:" in skipped.stderr
    assert "2 skipped" in skipped.stderr
    ids, _, _ = load_embeddings(out)
    assert ids == ["ok", "fine"]


def test_unreadable_and_missing_inputs_are_reported(service, digit_folder, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    done = quotient(
        service,
        "embed",
        "--model",
        MOLECULE,
        str(tmp_path / "notes.txt"),
        "-o",
        str(tmp_path / "o.npy"),
        check=2,
    )
    assert "not a molecule file" in done.stderr
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    done = quotient(
        service,
        "--on-error",
        "skip",
        "embed",
        "--model",
        IMAGE,
        str(garbage),
        str(digit_folder / "d0.png"),
        str(tmp_path / "missing.png"),
        "-o",
        str(tmp_path / "o.npy"),
    )
    assert f"skipped {garbage}:" in done.stderr and "missing.png: no such file" in done.stderr
    assert load_embeddings(tmp_path / "o.npy")[0] == [str(digit_folder / "d0.png")]


def test_the_key_is_required_and_taken_from_the_environment(service, library, tmp_path):
    out = str(tmp_path / "o.npy")
    refused = quotient(
        service,
        "embed",
        "--model",
        MOLECULE,
        str(library),
        "-o",
        out,
        env={"QUOTIENT_API_KEY": ""},
        check=1,
    )
    assert "UNAUTHENTICATED" in refused.stderr
    quotient(
        service,
        "--api-key",
        KEY,
        "embed",
        "--model",
        MOLECULE,
        "--smiles",
        "CO",
        "-o",
        out,
        env={"QUOTIENT_API_KEY": ""},
    )


def _search_json(done) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_index_and_search_a_faiss_folder_invariantly(service, library, digit_folder, tmp_path):
    index = str(tmp_path / "index")
    added = quotient(service, "index", "add", "--index", index, "--model", MOLECULE, str(library))
    assert "indexed 8 items" in added.stderr
    # ethanol and THF written with other atom numberings: found at rank 1
    done = quotient(
        service,
        "search",
        "--index",
        index,
        "-k",
        "3",
        "--json",
        "--smiles",
        "OCC",
        "--smiles",
        "O1CCCC1",
    )
    lines = _search_json(done)
    assert [line["query"] for line in lines] == ["OCC", "O1CCCC1"]
    assert [line["hits"][0]["id"] for line in lines] == ["ethanol", "thf"]
    assert all(len(line["hits"]) == 3 for line in lines)
    info = json.loads(quotient(service, "index", "info", "--index", index).stdout)
    scores = [h["score"] for h in lines[0]["hits"]]
    assert scores == sorted(scores, reverse=higher_is_better(info["metric"]))  # best first
    # upsert: adding again keeps 8 items; another model's vectors are refused
    again = quotient(service, "index", "add", "--index", index, "--model", MOLECULE, str(library))
    assert "(8 in" in again.stderr
    wrong = quotient(
        service, "index", "add", "--index", index, "--model", IMAGE, str(digit_folder), check=1
    )
    assert MOLECULE in wrong.stderr and IMAGE in wrong.stderr
    info = json.loads(quotient(service, "index", "info", "--index", index).stdout)
    assert info["items"] == 8 and info["model"] == MOLECULE
    quotient(service, "index", "delete", "--index", index, "ethanol")
    after = _search_json(quotient(service, "search", "--index", index, "--json", "--smiles", "CCO"))
    assert "ethanol" not in [h["id"] for h in after[0]["hits"]]


def test_search_text_output_lists_ranked_hits(service, digit_folder, tmp_path):
    index = str(tmp_path / "images")
    quotient(service, "index", "add", "--index", index, "--model", IMAGE, str(digit_folder))
    query = tmp_path / "query.png"
    first = digit_folder / "d0.png"
    from PIL import Image

    Image.open(first).rotate(90).save(query)
    done = quotient(service, "search", "--index", index, "-k", "2", str(query))
    lines = done.stdout.splitlines()
    assert lines[0] == str(query) and lines[1].split()[0] == "1"
    assert lines[1].split()[-1] == str(first)


@pytest.mark.parametrize("backend", ["postgresql", "milvus"])
def test_index_and_search_by_url_on_real_servers(service, library, request, backend):
    """The same commands against PostgreSQL+pgvector (postgresql://...#collection) and Milvus
    (milvus://host:port/collection)."""
    if backend == "postgresql":
        index = request.getfixturevalue("postgres_dsn") + "#cli_library"
    else:
        index = request.getfixturevalue("milvus_uri").replace("http://", "milvus://") + "/cli_lib"
    quotient(service, "index", "add", "--index", index, "--model", MOLECULE, str(library))
    done = quotient(
        service, *f"search --index {index} -k 2 --json --smiles OCC --smiles CC(C)=O".split()
    )
    lines = _search_json(done)
    assert [line["hits"][0]["id"] for line in lines] == ["ethanol", "acetone"]
    info = json.loads(quotient(service, "index", "info", "--index", index).stdout)
    assert info["items"] == 8 and info["model"] == MOLECULE
