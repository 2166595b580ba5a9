"""Molecule standardisation through the public gRPC API: a model's policy (model.json
``input.standardize``), the notes each embedding carries about what was changed or ignored, the
request's opt-out, GetModel's statement of the policy, the SDK (sync, async, streams) and the CLI.

The store: qm9-vae as shipped (no policy), the same model with a policy ("qm9-std"), and a tiny
untrained model with a larger domain ("tiny-drug", policy on) for a drug salt.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from quotient_client import AsyncClient, Client, InvalidInputError
from quotient_client.export import load_embeddings
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

QM9_VAE = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"
POLICY = ["largest_fragment", "neutralize", "strip_isotopes"]
SALT, PARENT = "CC(=O)[O-].[Na+]", "CC(=O)O"  # sodium acetate, acetic acid
ASPIRIN_SALT, ASPIRIN = "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]", "CC(=O)Oc1ccccc1C(=O)O"
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _copy_qm9(root: Path, name: str, standardize: list[str] | None) -> None:
    target = root / name
    target.mkdir()
    for f in ("model.json", "projection.json", "encoder.onnx", "decoder.onnx", "MODEL_CARD.md"):
        shutil.copy(QM9_VAE / f, target)
    spec = json.loads((target / "model.json").read_text())
    spec["name"] = name
    if standardize is not None:
        spec["input"]["standardize"] = standardize
    (target / "model.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quotient_models.molecules.featurize import MoleculeDomain
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("std-store")
    _copy_qm9(root, "qm9-vae", None)
    _copy_qm9(root, "qm9-std", POLICY)
    domain = MoleculeDomain(16, ("C", "N", "O", "F", "S", "Cl"), (-1, 0, 1), 4)
    write_tiny_molecule_model(root / "tiny-drug", domain=domain)
    spec = json.loads((root / "tiny-drug" / "model.json").read_text())
    spec["name"] = "tiny-drug"
    spec["input"]["standardize"] = POLICY
    (root / "tiny-drug" / "model.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def service(start_service, store: Path):
    return start_service(model_store=str(store))


def _embed_raw(target: str, model: str, smiles: list[str], **fields) -> pb.EmbedResponse:
    import grpc

    request = pb.EmbedRequest(
        model=model, inputs=[pb.Input(molecule=pb.Molecule(smiles=s)) for s in smiles], **fields
    )
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=60)


def test_a_salt_is_refused_by_a_model_without_a_policy(service) -> None:
    with Client(service.target) as client:
        with pytest.raises(InvalidInputError) as info:
            client.embed(["CCO", SALT], model="qm9-vae")
        assert client.get_model("qm9-vae").input_limits.standardization == ()
    assert info.value.index == 1 and "2 fragments" in str(info.value)


def test_a_salt_embeds_as_its_parent_with_notes_on_its_own_row(service) -> None:
    items = ["CCO", SALT, PARENT, "[NH3+]CC(=O)[O-]", "[13CH3]O", "NCC(=O)O"]
    with Client(service.target) as client:
        e = client.embed(items, model="qm9-std")
    np.testing.assert_allclose(e.vectors[1], e.vectors[2], **TOL)
    np.testing.assert_allclose(e.vectors[3], e.vectors[5], **TOL)  # zwitterion → neutral
    assert e.noted == [1, 3, 4]
    kinds = [[n.kind for n in notes] for notes in e.notes]
    assert kinds == [
        [],
        ["fragments_removed", "charges_neutralized"],
        [],
        ["charges_neutralized"],
        ["isotopes_removed"],
        [],
    ]
    fragments, charges = e.notes[1]
    assert fragments.removed_fragments == ("[Na+]",) and "[Na+]" in fragments.message
    assert [(a.index, a.element, a.old_charge, a.new_charge) for a in charges.atoms] == [
        (3, "O", -1, 0)
    ]
    assert [(a.index, a.element, a.isotope) for a in e.notes[4][0].atoms] == [(0, "C", 13)]
    assert [len(n) for n in e[[1, 0]].notes] == [2, 0]  # row selection keeps notes with rows


def test_the_raw_response_carries_the_notes(service) -> None:
    response = _embed_raw(service.target, "qm9-std", ["CCO", SALT])
    assert list(response.embeddings[0].notes) == []
    (fragments, charges) = response.embeddings[1].notes
    assert fragments.kind == pb.INPUT_NOTE_KIND_FRAGMENTS_REMOVED
    assert list(fragments.removed_fragments) == ["[Na+]"]
    assert charges.kind == pb.INPUT_NOTE_KIND_CHARGES_NEUTRALIZED
    assert (charges.atoms[0].atom_index, charges.atoms[0].old_charge) == (3, -1)


def test_a_request_can_turn_standardisation_off(service) -> None:
    with Client(service.target) as client:
        with pytest.raises(InvalidInputError) as info:
            client.embed(["CCO", SALT], model="qm9-std", standardize=False)
        with pytest.raises(InvalidInputError):
            client.embed_molecules([SALT], model="qm9-std", standardize=False)
        said = client.embed([SALT], model="qm9-std", standardize=True)
    assert info.value.index == 1 and "2 fragments" in str(info.value)
    assert [n.kind for n in said.notes[0]] == ["fragments_removed", "charges_neutralized"]
    import grpc

    with pytest.raises(grpc.RpcError) as raw:
        _embed_raw(service.target, "qm9-std", [SALT], standardization=pb.STANDARDIZATION_NONE)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("model", ["qm9-vae", "qm9-std"])
def test_stereo_is_reported_and_ignored_by_every_model(service, model: str) -> None:
    with Client(service.target) as client:
        e = client.embed(["C[C@H](N)O", "CC(N)O", "C[C@@H](N)O", "CC(N)O"], model=model)
        off = client.embed(["C[C@H](N)O"], model=model, standardize=False)
    np.testing.assert_allclose(e.vectors[0], e.vectors[1], **TOL)
    np.testing.assert_allclose(e.vectors[2], e.vectors[1], **TOL)
    assert e.noted == [0, 2]
    (note,) = e.notes[0]
    assert (note.kind, note.chiral_centers, note.stereo_bonds) == ("stereo_ignored", 1, 0)
    assert "stereochemistry ignored" in note.message
    assert [n.kind for n in off.notes[0]] == ["stereo_ignored"]  # not standardisation


def test_a_drug_salt_embeds_as_the_drug(service) -> None:
    with Client(service.target) as client:
        e = client.embed([ASPIRIN_SALT, ASPIRIN], model="tiny-drug")
    np.testing.assert_allclose(e.vectors[0], e.vectors[1], **TOL)
    assert e.notes[0][0].removed_fragments == ("[Na+]",) and e.notes[1] == ()


def test_get_model_states_the_standardisation(service) -> None:
    with Client(service.target) as client:
        steps = client.get_model("qm9-std").input_limits.standardization
    assert [s.name for s in steps] == POLICY
    assert "largest organic fragment" in steps[0].description


def test_notes_stay_with_their_items_across_requests_and_streams(service) -> None:
    """300 items in requests of 64 (batched with each other on the server), in a stream too:
    every salt's notes, and only those, on its row."""
    items = [SALT if k % 7 == 3 else "C[C@H](N)O" if k % 11 == 5 else "CCO" for k in range(300)]
    with Client(service.target) as client:
        whole = client.embed(items, model="qm9-std", batch_size=64, concurrency=3)
        streamed = list(client.embed_stream(items, model="qm9-std", batch_size=64))
    want = [k for k, s in enumerate(items) if s != "CCO"]
    assert whole.noted == want
    assert [k for part in streamed for k in range(len(part))] == [k % 64 for k in range(300)]
    assert [n for part in streamed for n in part.notes] == list(whole.notes)
    for k in want:
        kind = "fragments_removed" if items[k] == SALT else "stereo_ignored"
        assert whole.notes[k][0].kind == kind


def test_the_async_client_passes_the_opt_out_and_returns_notes(service) -> None:
    async def run():
        async with AsyncClient(service.target) as client:
            noted = await client.embed([SALT, "CCO"], model="qm9-std")
            try:
                await client.embed([SALT], model="qm9-std", standardize=False)
            except InvalidInputError as exc:
                return noted, exc
        return noted, None

    noted, refused = asyncio.run(run())
    assert noted.noted == [0] and refused is not None and refused.index == 0


def test_the_cli_reports_notes_and_keeps_them_in_the_metadata(service, tmp_path: Path) -> None:
    quotient = Path(sys.executable).parent / "quotient"
    env = {**os.environ, "QUOTIENT_TARGET": service.target}
    out = tmp_path / "out.parquet"
    args = [str(quotient), "embed", "--model", "qm9-std", "--smiles", SALT, "--smiles", "CCO"]
    done = subprocess.run(
        [*args, "-o", str(out)], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert "removed 1 fragment: [Na+]" in done.stderr
    _, embeddings, metadata = load_embeddings(out)
    assert metadata is not None and len(embeddings) == 2
    assert any("[Na+]" in n for n in metadata[0]["notes"]) and "notes" not in metadata[1]
    refused = subprocess.run(
        [*args, "--no-standardize", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert refused.returncode == 2 and "2 fragments" in refused.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
)
def test_torchserve_backend_attaches_the_same_notes(
    service, torchserve_service_at, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The service in front of TorchServe prepares the items itself: same rows, same notes."""
    root = tmp_path_factory.mktemp("ts-std-store")
    _copy_qm9(root, "qm9-std", POLICY)
    items = ["CCO", SALT, "C[C@H](N)O", PARENT]
    with Client(service.target) as client:
        want = client.embed(items, model="qm9-std")
    with torchserve_service_at(root) as target, Client(target) as client:
        got = client.embed(items, model="qm9-std")
        with pytest.raises(InvalidInputError) as info:
            client.embed(items, model="qm9-std", standardize=False)
        steps = client.get_model("qm9-std").input_limits.standardization
    np.testing.assert_allclose(got.vectors, want.vectors, **TOL)
    assert got.notes == want.notes and got.noted == [1, 2]
    assert info.value.index == 1 and [s.name for s in steps] == POLICY
