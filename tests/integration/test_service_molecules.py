"""Molecules through the public gRPC API, on both backends' shared code path (embedded here):
embeddings that do not depend on the atom numbering, and per-item errors with reasons.

Uses the tiny untrained molecule model: its figures mean nothing, its invariance is structural.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from rdkit import Chem

from quotient_client import Client, InvalidInputError


@pytest.fixture(scope="module")
def service(start_service, tmp_path_factory):
    from quotient_models.molecules.evaluate import refresh_figures
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("molstore")
    model_dir = write_tiny_molecule_model(root / "tiny-mol")
    # an evaluation's full result as the card reads it; GetModel must serve only its figures
    result = {"name": "reconstruction", "molecules": 4, "agreement_sorted_raw": 1.0}
    result |= {"exact_rate_sorted": 0.75, "exact_rate_raw": 0.5}
    (model_dir / "metrics.json").write_text(json.dumps([result]))
    refresh_figures(model_dir)
    return start_service(model_store=str(root))


def renumberings(smiles: str, n: int, seed: int) -> list[str]:
    """n SMILES of the same molecule with randomly permuted atom numbering."""
    mol = Chem.MolFromSmiles(smiles)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        order = [int(i) for i in rng.permutation(mol.GetNumAtoms())]
        out.append(Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False))
    return out


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1", "CC(C)(C)C", "OC(=O)C1CC1", "N#CC(F)=O"])
@pytest.mark.parametrize("projection", ["sorted", "sum", "mean"])
def test_embedding_does_not_depend_on_atom_numbering(service, smiles, projection):
    variants = [smiles, *renumberings(smiles, 6, seed=len(smiles))]
    with Client(service.target) as client:
        e = client.embed_molecules(variants, model="tiny-mol", projection=projection)
    rel = np.abs(e - e[0]).max() / max(np.abs(e[0]).max(), 1e-12)
    assert rel <= 1e-5, f"{projection} changed by {rel:.2e} over renumberings of {smiles}"


def test_raw_latent_depends_on_numbering(service):
    variants = ["OCC(=O)N", *renumberings("OCC(=O)N", 6, seed=1)]
    with Client(service.target) as client:
        e = client.embed_molecules(variants, model="tiny-mol", projection="raw")
    assert np.abs(e - e[0]).max() > 1e-3


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("C1CC", "unparsable"),
        ("", "empty"),
        ("CCO.O", "fragment"),
        ("CCCCCCCCCC", "atoms"),
        ("CC[Si]", "element"),
        ("CC O", "whitespace"),  # answered OK with ethane before
        ("ＣＣO", "printable ascii"),  # answered OK with water before
        ("N->C", "dative"),  # answered OK with a single bond before
        ("COc1cc~ncc1", "unspecified"),  # INTERNAL with a traceback before
    ],
)
def test_bad_smiles_name_the_item_and_the_reason(service, bad, reason):
    with Client(service.target) as client, pytest.raises(InvalidInputError) as info:
        client.embed_molecules(["CCO", bad, "CC"], model="tiny-mol")
    assert info.value.index == 1 and reason in str(info.value).lower()


def test_get_model_states_the_domain(service):
    with Client(service.target) as client:
        info = client.get_model("tiny-mol")
    assert info.modality == "molecule" and info.default_projection == "sorted"
    assert info.input_limits.max_atoms == 9
    assert set(info.input_limits.elements) == {"C", "N", "O", "F"}
    raw = next(p for p in info.projections if p.name == "raw")
    assert not raw.invariant and all(p.invariant for p in info.projections if p.name != "raw")
    assert [(p.metric, p.normalized) for p in info.projections] == [("l2", False)] * 4


def test_get_model_serves_the_card_figures_not_the_nested_results(service):
    with Client(service.target) as client:
        info = client.get_model("tiny-mol")
    assert info.metrics == {
        "reconstruction.exact_rate.sorted": 0.75,
        "reconstruction.exact_rate.raw": 0.5,
        "reconstruction.agreement_sorted_raw": 1.0,
    }


# --- MolBlock / SDF input through the public API -------------------------------------------


def test_molblock_rdkit_mol_and_smiles_give_the_same_embedding(service):
    smiles = ["OC(=O)C1CC1", "c1ccccc1O", "CC(C)(C)C"]
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    renumbered = [Chem.RenumberAtoms(m, list(range(m.GetNumAtoms()))[::-1]) for m in mols]
    blocks = [Chem.MolToMolBlock(m) + ">  <id>\nx\n\n$$$$\n" for m in renumbered]  # SDF records
    with Client(service.target) as client:
        a = client.embed_molecules(smiles, model="tiny-mol")
        b = client.embed_molecules(blocks, model="tiny-mol")
        c = client.embed_molecules(mols, model="tiny-mol")
        lone = client.embed_molecules(mols[0], model="tiny-mol")
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lone, a[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("molecule", "field", "reason"),
    [
        ({"molblock": "CCO"}, "molblock", "a MolBlock has several lines"),
        ({"molblock": "title\n\n\n  0  0  0\n"}, "molblock", "no 'M  END' line"),
        ({"smiles": "CCO\nCC"}, "smiles", "SMILES has a line break"),
        ({"molblock": "$$$$\n$$$$"}, "molblock", "holds no record"),  # INTERNAL before
        (
            {"molblock": "title\n\n\n  x  y  z\nM  END\n"},
            "molblock",
            "counts line does not start with atom and bond counts",
        ),
        (
            {"molblock": Chem.MolToMolBlock(Chem.MolFromSmiles("CC")) * 2},
            "molblock",
            "text holds 2 MolBlocks",
        ),
    ],
)
def test_bad_molblock_names_the_item_field_and_reason(service, molecule, field, reason):
    """Raw stub, so that the field names of the wire format are what is checked."""
    import grpc
    from google.rpc import error_details_pb2, status_pb2

    from quotient_client.proto import embedding_service_pb2 as pb
    from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

    good = pb.Input(molecule=pb.Molecule(smiles="CCO"))
    request = pb.EmbedRequest(
        model="tiny-mol", inputs=[good, pb.Input(molecule=pb.Molecule(**molecule)), good]
    )
    with grpc.insecure_channel(service.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=30)
        again = pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(model="tiny-mol", inputs=[good]), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("input 1: ") and reason in info.value.details()
    status = status_pb2.Status.FromString(
        dict(info.value.trailing_metadata())["grpc-status-details-bin"]
    )
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [v.field for v in bad.field_violations]
    assert violations == [f"inputs[1].molecule.{field}"]
    assert len(again.embeddings) == 1  # the server goes on serving


def test_concurrent_molecules_of_different_sizes_batch_without_mixing(
    start_service, tmp_path_factory
):
    """Single-molecule calls sent at once are batched together (padded to the model's
    max_atoms, cost = atoms) and each caller gets its own molecule's embedding."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from quotient_client.proto import embedding_service_pb2 as pb
    from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
    from quotient_models.molecules.model import load_molecule_model
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("molstore-batch")
    write_tiny_molecule_model(root / "tiny-mol")
    smiles = ["C", "CO", "CCO", "OC1CC1", "CC(=O)N", "c1ccccc1", "OC(=O)C1CC1", "CC(C)(C)CO"] * 4
    want = load_molecule_model(root / "tiny-mol", engine="onnx").embed_smiles(smiles).values
    svc = start_service(model_store=str(root), max_batch_delay_ms=50.0, max_batch_items=64)
    with grpc.insecure_channel(svc.target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        def one(s: str) -> pb.EmbedResponse:
            request = pb.EmbedRequest(
                model="tiny-mol", inputs=[pb.Input(molecule=pb.Molecule(smiles=s))]
            )
            return stub.Embed(request, timeout=30)

        with ThreadPoolExecutor(len(smiles)) as pool:
            replies = list(pool.map(one, smiles))
    got = np.array([r.embeddings[0].values for r in replies], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(r.metadata.batch_size for r in replies) > 1  # they really shared batches
