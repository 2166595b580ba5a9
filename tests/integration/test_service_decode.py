"""Decode through the public gRPC API (embedded backend; TorchServe runs the same handle_payload):
one result per embedding, independent of the atom numbering, the refusals of the error table, and
the committed qm9-vae model giving its inputs back.

The tiny molecule model is untrained: its decodes are mostly invalid, so only their structure is
tested there; chemistry is tested with the real model.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from rdkit import Chem

from quotient_client import (
    Client,
    DecodedMolecule,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
)
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

QM9_VAE = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"
SMILES = ["CCO", "c1ccccc1", "CC(=O)N", "OC1CC1"]


@pytest.fixture(scope="module")
def service(start_service, tmp_path_factory):
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("decodestore")
    write_tiny_molecule_model(root / "tiny-mol")
    return start_service(model_store=str(root))


@pytest.fixture(scope="module")
def image_service(start_service, tiny_model_store):
    return start_service(model_store=str(tiny_model_store))


def renumbered(smiles: str, seed: int) -> str:
    mol = Chem.MolFromSmiles(smiles)
    order = [int(i) for i in np.random.default_rng(seed).permutation(mol.GetNumAtoms())]
    return Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False)


def test_one_result_per_embedding_each_a_molecule_or_a_reason(service):
    with Client(service.target) as client:
        decoded = client.decode(client.embed_molecules(SMILES))
    assert len(decoded) == len(SMILES)
    for d in decoded:
        assert isinstance(d, DecodedMolecule)
        assert (d.smiles is None) != (d.reason is None), d


def test_decoding_does_not_depend_on_atom_numbering(service):
    variants = ["OC(=O)C1CC1", *(renumbered("OC(=O)C1CC1", seed) for seed in range(4))]
    with Client(service.target) as client:
        decoded = client.decode(client.embed_molecules(variants, model="tiny-mol"))
    # the same answer; distances (in the reason too) to float noise, as the embeddings
    assert [d.smiles for d in decoded] == [decoded[0].smiles] * len(variants)
    assert [d.distance is None for d in decoded] == [decoded[0].distance is None] * len(variants)
    if decoded[0].distance is not None:
        assert [d.distance for d in decoded] == pytest.approx([decoded[0].distance] * 5, abs=1e-5)


def test_request_id_and_model_are_echoed(service):
    with Client(service.target) as client:
        values = client.embed_molecules(["CCO"])
    with grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.DecodeRequest(
            model="tiny-mol", embeddings=[pb.Embedding(values=values[0].tolist())], request_id="r-7"
        )
        response = stub.Decode(request, timeout=30)
    assert response.model == "tiny-mol" and response.request_id == "r-7"
    assert len(response.molecules) == 1


def test_model_without_decoder_is_a_failed_precondition(image_service):
    with Client(image_service.target) as client, pytest.raises(FailedPreconditionError) as info:
        client.decode(np.zeros((1, 8), np.float32), model="tiny-c4")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.reason == "NO_DECODER"
    assert "no decoder" in info.value.message and "tiny-c4" in info.value.message


def test_wrong_length_names_the_embedding(service):
    with Client(service.target) as client:
        values = client.embed_molecules(SMILES, model="tiny-mol")
        rows = [list(v) for v in values]
        rows[2] = rows[2] + [0.0]
        with pytest.raises(InvalidInputError) as info:
            client.decode(rows, model="tiny-mol")
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.index == 2 and err.field == "embeddings[2].values"
    assert f"{values.shape[1] + 1} values" in err.message and str(values.shape[1]) in err.message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda r: r.__setitem__(0, float("nan")), "nan is neither a latent value"),
        (lambda r: r.__setitem__(1, 1.2), "1.2 is neither a latent value"),
        (
            lambda r: r.__setitem__(len(r) - 1, 0.5),
            "mixes padding (1.25 in the row's first value, 0 in the others) with latent values",
        ),
        (lambda r: r.__setitem__(len(r) - 4, 0.5), "is an atom after padding row 6"),
    ],
)
def test_values_no_embedding_has_are_refused_with_the_reason(service, change, words):
    with Client(service.target) as client:
        rows = [list(v) for v in client.embed_molecules(SMILES, model="tiny-mol")]
        change(rows[1])
        with pytest.raises(InvalidInputError) as info:
            client.decode(rows, model="tiny-mol")
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.index == 1 and err.field == "embeddings[1].values"
    assert words in err.message and "not a 'sorted' embedding of 'tiny-mol'" in err.message


def test_wrong_length_index_counts_from_the_callers_first_item(service):
    with Client(service.target) as client:
        rows = [list(v) for v in client.embed_molecules(SMILES, model="tiny-mol")]
        rows[3] = rows[3][:-1]
        with pytest.raises(InvalidInputError) as info:
            client.decode(rows, model="tiny-mol", batch_size=2)
    assert info.value.index == 3 and info.value.field == "embeddings[3].values"


def test_no_embeddings_is_invalid(service):
    with grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Decode(pb.DecodeRequest(model="tiny-mol"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_is_not_found(service):
    with Client(service.target) as client, pytest.raises(ModelNotFoundError) as info:
        client.decode([[0.0] * 4], model="no-such-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "tiny-mol" in info.value.message


@pytest.mark.skipif(not (QM9_VAE / "model.json").is_file(), reason="qm9-vae is not committed here")
def test_trained_model_gives_its_inputs_back(start_service, tmp_path_factory):
    from quotient_models.runtime import load_model

    root = tmp_path_factory.mktemp("qm9store")
    (root / "qm9-vae").symlink_to(QM9_VAE, target_is_directory=True)
    served = start_service(model_store=str(root))
    with Client(served.target) as client:
        decoded = client.decode(client.embed_molecules(SMILES))
    # Through the API exactly what the model code gives in process.
    model = load_model(QM9_VAE)
    local = model.decode(model.embed_smiles(SMILES).values)
    assert [(d.smiles, d.reason) for d in decoded] == [(d.smiles, d.reason) for d in local]
    # The inputs come back as their canonical SMILES (benzene included since qm9-vae 1.1.0; the
    # card lists the smallest test molecules that do not).
    expected = [(Chem.MolToSmiles(Chem.MolFromSmiles(s)), None) for s in SMILES]
    assert [(d.smiles, d.reason) for d in decoded] == expected


@pytest.mark.skipif(not (QM9_VAE / "model.json").is_file(), reason="qm9-vae is not committed here")
def test_trained_model_states_its_metric_and_pads_with_the_marker_row(start_service, tmp_path):
    """Since qm9-vae 1.3.0 a missing atom is the row (1.25, 0, ..., 0), not eight 2.0s, and every
    projection is compared with L2 (the card's neighbour figures); GetModel says so."""
    (tmp_path / "qm9-vae").symlink_to(QM9_VAE, target_is_directory=True)
    served = start_service(model_store=str(tmp_path))
    with Client(served.target) as client:
        info = client.get_model("qm9-vae")
        ethanol = client.embed_molecules(["CCO"])[0].reshape(9, 8)  # 3 heavy atoms
        decoded = client.decode(ethanol.reshape(1, -1))
    assert {(p.name, p.metric, p.normalized) for p in info.projections} == {
        (name, "l2", False) for name in ("sorted", "sum", "mean", "raw")
    }
    assert "padding rows (1.25, 0, 0, 0, 0, 0, 0, 0)" in info.projection("sorted").description
    assert (np.abs(ethanol[:3]) < 1).all()
    np.testing.assert_array_equal(ethanol[3:], np.tile([1.25] + [0.0] * 7, (6, 1)))
    assert decoded == [DecodedMolecule("CCO", None, decoded[0].distance)]


# The simplest molecules (single atoms, ions, small rings, multiple bonds: the card's "simplest
# molecules" section) and what qm9-vae 1.3.0 gives back for each: itself, or no SMILES with a
# reason. Never another molecule: a decode is verified by embedding it again.
SIMPLEST_BACK = ["C", "N", "O", "[NH4+]", "C[NH3+]", "[C-]#N", "C#C", "C#N", "O=C=O", "N#N", "C=O"]
SIMPLEST_REFUSED = ["F", "[OH-]", "C[O-]", "C1CC1", "C1CO1", "C=C"]


@pytest.fixture(scope="module")
def qm9_service(start_service, tmp_path_factory):
    if not (QM9_VAE / "model.json").is_file():
        pytest.skip("qm9-vae is not committed here")
    root = tmp_path_factory.mktemp("qm9simplest")
    (root / "qm9-vae").symlink_to(QM9_VAE, target_is_directory=True)
    return start_service(model_store=str(root))


def canonical(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)


def test_simplest_molecules_come_back_exactly_or_are_refused_with_a_reason(qm9_service):
    smiles = SIMPLEST_BACK + SIMPLEST_REFUSED
    with Client(qm9_service.target) as client:
        decoded = client.decode(client.embed_molecules(smiles))
        raw = client.decode(client.embed_molecules(smiles, projection="raw"))
    for s, d, r in zip(smiles, decoded, raw, strict=True):
        assert d.smiles in (None, canonical(s)), (s, d)  # never another molecule
        assert (d.smiles is None) == (d.reason is not None), (s, d)
        assert (r.smiles, r.distance is None) == (d.smiles, d.distance is None), (s, d, r)
    assert [d.smiles for d in decoded[: len(SIMPLEST_BACK)]] == [
        canonical(s) for s in SIMPLEST_BACK
    ]
    for s, d in zip(SIMPLEST_BACK, decoded, strict=False):
        assert d.distance is not None and d.distance <= 1e-5, (s, d)
    for s, d in zip(SIMPLEST_REFUSED, decoded[len(SIMPLEST_BACK) :], strict=True):
        assert d.smiles is None and d.distance is not None and d.distance > 1e-3, (s, d)
        assert f"re-embeds {d.distance:.3g} away from this embedding (tolerance 0.001)" in d.reason


def test_test_split_molecules_still_decode_exactly(qm9_service):
    from quotient_models.molecules.data import load

    data_dir = QM9_VAE.parents[2] / "data" / "qm9"
    if not (data_dir / "manifest.json").is_file():
        pytest.skip("data/qm9 is not prepared here")
    data = load(data_dir)
    rows = np.random.default_rng(0).choice(data.rows("test"), 64, replace=False)
    smiles = [str(data.arrays["smiles"][r]) for r in rows]
    with Client(qm9_service.target) as client:
        decoded = client.decode(client.embed_molecules(smiles))
    hits = [d.smiles == s for d, s in zip(decoded, smiles, strict=True)]
    assert all(d.smiles in (None, s) for d, s in zip(decoded, smiles, strict=True))
    assert sum(hits) >= 62  # 99.65% of the test split (the card); the misses are refused
    assert max(d.distance for d in decoded if d.smiles) <= 1e-5


def test_a_perturbed_embedding_is_refused_with_its_distance(qm9_service):
    with Client(qm9_service.target) as client:
        [ethanol] = client.embed_molecules(["CCO"])
        moved = ethanol.copy()
        moved[0] += 0.05  # a point no molecule made; the decoder still reads ethanol
        midway = (ethanol + client.embed_molecules(["CCN"])[0]) / 2
        refused = client.decode(np.stack([moved, midway]))
        allowed = client.decode(np.stack([moved, midway]), allow_inexact=True)
    for d in refused:
        assert d.smiles is None and d.distance is not None and d.distance > 1e-3
        assert f"re-embeds {d.distance:.3g} away from this embedding (tolerance 0.001)" in d.reason
    assert refused[0].distance == pytest.approx(0.05, abs=1e-4)
    assert refused[0].reason.startswith("decoded CCO re-embeds")
    # allow_inexact: the decoder's molecule anyway, with the same distance and no reason
    assert allowed[0] == DecodedMolecule("CCO", None, refused[0].distance)
    assert allowed[1].smiles is not None and allowed[1].distance == refused[1].distance
