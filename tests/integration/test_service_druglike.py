"""The drug-like molecule model (model_store/models/druglike-vae) through the public gRPC API, on
both backends: its domain and standardisation in GetModel, the drugs qm9-vae refuses, invariance
under renumbering, batches of molecules of different sizes, and verified decoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from rdkit import Chem

from quotient_client import Client, InvalidInputError

MODEL = "druglike-vae"
MODEL_DIR = Path(__file__).resolve().parents[2] / "model_store" / "models" / MODEL
# the drugs the issue measured qm9-vae to refuse, and the largest ChEMBL-like sizes
DRUGS = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "ibuprofen": "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
    "penicillin G": "CC1(C)SC2C(NC(=O)Cc3ccccc3)C(=O)N2C1C(=O)O",
    "atorvastatin": "CC(C)c1c(C(=O)Nc2ccccc2)c(-c2ccccc2)c(-c2ccc(F)cc2)n1CCC(O)CC(O)CC(=O)O",
}
# MOSES test molecules (molsets), the kind the model was trained on
MOSES = [
    "CC1C2CCC(C2)C1CN(CCO)C(=O)c1ccc(Cl)cc1",
    "COc1ccc(-c2cc(=O)c3c(O)c(OC)c(OC)cc3o2)cc1O",
    "CCOC(=O)c1ccc(NC(=O)c2ccccc2)cc1",
    "Cc1ccc(S(=O)(=O)N2CCCC2)cc1",
    "O=C(NCc1ccco1)c1ccc(Br)cc1",
    "CN1CCN(C(=O)c2ccc(F)cc2)CC1",
]
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("druglike-store")
    shutil.copytree(MODEL_DIR, root / MODEL, ignore=shutil.ignore_patterns("checkpoint.pt"))
    return root


@pytest.fixture(scope="module")
def service(start_service, store: Path):
    return start_service(model_store=str(store))


def renumbered(smiles: str, seed: int) -> str:
    mol = Chem.MolFromSmiles(smiles)
    order = [int(i) for i in np.random.default_rng(seed).permutation(mol.GetNumAtoms())]
    return Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False)


def test_get_model_states_the_domain_and_the_standardisation(service) -> None:
    with Client(service.target) as client:
        info = client.get_model(MODEL)
    lim = info.input_limits
    assert lim.max_atoms == 64
    assert set(lim.elements) == {"C", "N", "O", "S", "P", "F", "Cl", "Br", "I"}
    assert lim.formal_charges == (-1, 0, 1) and lim.max_hydrogens == 4
    assert [s.name for s in lim.standardization] == ["largest_fragment", "neutralize"]
    assert all(s.description for s in lim.standardization)
    assert info.default_projection == "sorted"
    assert "MOSES" in info.model_card


def test_drugs_that_qm9_vae_refuses_are_embedded_invariantly(service) -> None:
    names = list(DRUGS)
    with Client(service.target) as client:
        base = client.embed_molecules([DRUGS[n] for n in names], model=MODEL)
        again = client.embed_molecules([renumbered(DRUGS[n], 7) for n in names], model=MODEL)
    assert base.shape == (len(names), 64 * 16) and np.isfinite(base).all()
    np.testing.assert_allclose(again, base, **TOL)
    # distinct molecules, distinct embeddings
    dist = np.linalg.norm(base[:, None] - base[None], axis=-1)
    assert dist[~np.eye(len(names), dtype=bool)].min() > 0.1


def test_a_molecule_embeds_the_same_alone_and_in_a_batch_of_larger_ones(service) -> None:
    small = "CCO"
    with Client(service.target) as client:
        alone = client.embed_molecules([small], model=MODEL)
        mixed = client.embed_molecules([DRUGS["atorvastatin"], small, *MOSES], model=MODEL)
    np.testing.assert_allclose(mixed[1], alone[0], **TOL)


def test_a_salt_embeds_as_its_parent_and_says_so(service) -> None:
    with Client(service.target) as client:
        salt = client.embed(["CC(=O)Oc1ccccc1C(=O)[O-].[Na+]"], model=MODEL)
        parent = client.embed_molecules([DRUGS["aspirin"]], model=MODEL)
        with pytest.raises(InvalidInputError, match="fragment"):
            client.embed([f"{DRUGS['aspirin']}.[Na+].[Cl-]"], model=MODEL, standardize=False)
    np.testing.assert_allclose(salt.vectors, parent, **TOL)
    kinds = {n.kind for n in salt.notes[0]}
    assert kinds, "the response must say what standardisation changed"


def test_outside_the_domain_is_refused_with_the_reason(service) -> None:
    with Client(service.target) as client:
        with pytest.raises(InvalidInputError, match="element"):
            client.embed_molecules(["CCO", "C[Si](C)(C)C"], model=MODEL)
        with pytest.raises(InvalidInputError, match="heavy atoms"):
            client.embed_molecules(["C" * 65], model=MODEL)


def test_decode_gives_the_molecule_back_or_a_reason_never_another(service) -> None:
    smiles = [*MOSES, *DRUGS.values()]
    with Client(service.target) as client:
        values = client.embed_molecules(smiles, model=MODEL)
        decoded = client.decode(values, model=MODEL)
    canonical = [Chem.MolToSmiles(Chem.MolFromSmiles(s), isomericSmiles=False) for s in smiles]
    exact = 0
    for got, want in zip(decoded, canonical, strict=True):
        if got.smiles is None:
            assert got.reason, want
        else:
            assert got.smiles == want
            exact += 1
    assert exact >= 1, "the model card reports a reconstruction rate well above zero"


def test_the_torchserve_backend_gives_the_same_embeddings(service, store, torchserve_service_at):
    smiles = [*MOSES[:3], DRUGS["caffeine"]]
    with Client(service.target) as client:
        want = client.embed_molecules(smiles, model=MODEL)
    with torchserve_service_at(store) as target, Client(target) as client:
        got = client.embed_molecules(smiles, model=MODEL)
    np.testing.assert_allclose(got, want, **TOL)
