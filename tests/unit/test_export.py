"""quotient_client.export: embeddings with ids, poses, metadata and their spec round-trip through
``.npy`` (+ JSON sidecar) and Parquet bit for bit; other tools read the files; bad input and
files that are not exports are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quotient_client._embeddings import Embeddings, EmbeddingSpec
from quotient_client.export import load_embeddings, save_embeddings, sidecar_path

SPEC = EmbeddingSpec("rotmnist-c8", "1.0.0", "align", 5, "cosine", True)


def embeddings(n: int = 4, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    poses = rng.uniform(0, 360, n)
    poses[::2] = np.nan  # a projection may compute no pose for some rows
    return Embeddings(rng.normal(size=(n, 5)).astype(np.float32), SPEC, poses)


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    emb = embeddings()
    ids = ["a.png", "dir/b.png", "mol:3", "é"]
    meta = [{"label": 3}, None, {"source": "x.smi", "line": 3}, {"tags": ["a", "b"]}]
    path = tmp_path / f"out{suffix}"
    written = save_embeddings(path, ids, emb, meta)
    assert written[0] == path and all(p.exists() for p in written)
    got_ids, got, got_meta = load_embeddings(path)
    assert got_ids == ids and got_meta == meta and got.spec == SPEC
    np.testing.assert_array_equal(got.vectors, emb.vectors)
    assert got.vectors.dtype == np.float32
    np.testing.assert_array_equal(got.poses, emb.poses)  # NaN where there was none
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_without_metadata_and_empty(tmp_path: Path, suffix: str) -> None:
    save_embeddings(tmp_path / f"a{suffix}", ["x", "y"], embeddings(2), [None, None])
    assert load_embeddings(tmp_path / f"a{suffix}")[2] is None
    empty = Embeddings(np.zeros((0, 5), np.float32), SPEC)
    save_embeddings(tmp_path / f"e{suffix}", [], empty)
    ids, got, meta = load_embeddings(tmp_path / f"e{suffix}")
    assert ids == [] and got.vectors.shape == (0, 5) and got.spec == SPEC and meta is None


def test_other_tools_read_the_files(tmp_path: Path) -> None:
    emb = embeddings()
    save_embeddings(tmp_path / "v.npy", list("abcd"), emb)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), emb.vectors)  # plain numpy
    side = json.loads(sidecar_path(tmp_path / "v.npy").read_text())
    assert sidecar_path(tmp_path / "v.npy").name == "v.ids.json"
    assert side["ids"] == list("abcd") and side["spec"] == SPEC.to_dict() and side["count"] == 4

    save_embeddings(tmp_path / "v.parquet", list("abcd"), emb, [{"k": 1}, None, None, None])
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column_names == ["id", "vector", "pose", "metadata"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 5)
    assert json.loads(table.schema.metadata[b"quotient.spec"]) == SPEC.to_dict()
    rows = table.to_pylist()
    assert rows[0]["id"] == "a" and json.loads(rows[0]["metadata"]) == {"k": 1}
    assert rows[0]["pose"] is None and rows[1]["pose"] == pytest.approx(emb.poses[1])
    np.testing.assert_array_equal(np.array(rows[3]["vector"], np.float32), emb.vectors[3])


@pytest.mark.parametrize(
    ("ids", "metadata", "error", "message"),
    [
        (["a", "b", "c"], None, ValueError, "3 ids for 4 embeddings"),
        (["a", "b", "a", "d"], None, ValueError, r"'a' is ids\[0\] and ids\[2\]"),
        (["a", "b", 3, "d"], None, ValueError, r"ids\[2\] must be a str, got int"),
        ("abcd", None, TypeError, "got one str"),
        (list("abcd"), [{}] * 3, ValueError, "3 metadata entries for 4 embeddings"),
        (list("abcd"), [None, "x", None, None], ValueError, r"metadata\[1\] must be a mapping"),
        (list("abcd"), [None, None, {"a": {1, 2}}, None], ValueError, r"metadata\[2\] is not JSON"),
        (list("abcd"), [None, None, None, {"x": float("nan")}], ValueError, r"metadata\[3\]"),
        (list("abcd"), {"a": 1}, TypeError, "one mapping .or None. per embedding"),
    ],
)
def test_bad_input_names_the_item(tmp_path: Path, ids, metadata, error, message) -> None:
    with pytest.raises(error, match=message):
        save_embeddings(tmp_path / "x.parquet", ids, embeddings(), metadata)
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_targets_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in .npy or .parquet, not '.csv'"):
        save_embeddings(tmp_path / "x.csv", ["a"], embeddings(1))
    with pytest.raises(TypeError, match="needs an Embeddings"):
        save_embeddings(tmp_path / "x.npy", ["a"], np.zeros((1, 5), np.float32))  # type: ignore[arg-type]


def test_files_that_are_not_exports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_embeddings(tmp_path / "absent.parquet")
    np.save(tmp_path / "bare.npy", np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"sidecar bare.ids.json .ids and spec. is missing"):
        load_embeddings(tmp_path / "bare.npy")

    save_embeddings(tmp_path / "v.npy", ["a", "b"], embeddings(2))
    np.save(tmp_path / "v.npy", np.ones((2, 5), np.float32))  # replaced after the export
    with pytest.raises(ValueError, match=r"not the ones v\.ids\.json was written with"):
        load_embeddings(tmp_path / "v.npy")
    np.save(tmp_path / "v.npy", np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"shape \[3, 5\], its sidecar says 2 vectors"):
        load_embeddings(tmp_path / "v.npy")
    sidecar_path(tmp_path / "v.npy").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a Quotient embeddings export"):
        load_embeddings(tmp_path / "v.npy")

    pq.write_table(pa.table({"id": ["a"], "x": [1.0]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="not a Quotient embeddings export"):
        load_embeddings(tmp_path / "plain.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_embeddings(tmp_path / "junk.parquet")
