"""Molecules through the public gRPC API, on both backends' shared code path (embedded here):
embeddings that do not depend on the atom numbering, and per-item errors with reasons.

Uses the tiny untrained molecule model: its figures mean nothing, its invariance is structural.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from rdkit import Chem

from quotient_client import Client, InvalidInputError


@pytest.fixture(scope="module")
def service(start_service, tmp_path_factory):
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("molstore")
    write_tiny_molecule_model(root / "tiny-mol")
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
