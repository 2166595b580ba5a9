"""A molecule model's standardisation policy (standardize.py): the steps, the notes that report
each change with the input's atom indices, the stereochemistry reported for every model, and
the policy read from model.json."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")
from rdkit import Chem
from rdkit.Chem import AllChem

from quotient_models.errors import InputError
from quotient_models.molecules.featurize import MoleculeDomain, featurize, featurize_noted
from quotient_models.molecules.standardize import STEPS, Standardization
from quotient_models.molecules.testing import QM9_DOMAIN
from quotient_models.notes import AtomChange
from quotient_models.runtime import InputLimits, PrepareOptions

DRUGLIKE = MoleculeDomain(
    max_atoms=20, elements=("C", "N", "O", "F", "S", "Cl"), charges=(-1, 0, 1), max_hydrogens=4
)
FULL = Standardization.from_json(["largest_fragment", "neutralize", "strip_isotopes"])
QM9_VAE = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"


def same_graph(a, b) -> None:
    assert a.smiles == b.smiles
    for name in ("atomic_numbers", "charges", "hydrogens", "symmetry", "bonds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_policy_from_model_json() -> None:
    assert Standardization.from_json(None).steps == ()
    # the steps run in one order, whatever the order listed
    assert Standardization.from_json(["strip_isotopes", "largest_fragment"]).steps == (
        "largest_fragment",
        "strip_isotopes",
    )
    assert [name for name, _ in FULL.describe()] == list(STEPS)
    assert all(words for _, words in FULL.describe())
    for bad, reason in [
        (["largest_fragment", "tautomer"], "unknown steps ['tautomer']"),
        (["neutralize", "neutralize"], "lists a step twice"),
        ("largest_fragment", "must be a list of step names"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            Standardization.from_json(bad)


def test_salt_becomes_its_parent_and_the_removed_fragment_is_noted() -> None:
    salt = "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]"
    graph, notes = featurize_noted(salt, DRUGLIKE, FULL)
    same_graph(graph, featurize("CC(=O)Oc1ccccc1C(=O)O", DRUGLIKE))
    assert [n.kind for n in notes] == ["fragments_removed", "charges_neutralized"]
    assert notes[0].fragments == ("[Na+]",)
    assert notes[1].atoms == (AtomChange(12, "O", -1, 0),)  # the carboxylate O, input index
    assert "[Na+]" in notes[0].message and "atom 12 (O) -1 -> 0" in notes[1].message
    # without standardisation: refused, as before
    with pytest.raises(InputError, match="molecule has 2 fragments"):
        featurize(salt, DRUGLIKE)
    with pytest.raises(InputError, match="molecule has 2 fragments"):
        featurize(salt, DRUGLIKE, Standardization())


def test_the_fragment_kept_does_not_depend_on_the_order_or_numbering() -> None:
    variants = ["CCO.COC", "COC.CCO", "OCC.O(C)C", "[Na+].CC(=O)[O-]", "CC(=O)[O-].[Na+]"]
    graphs = [featurize_noted(s, QM9_DOMAIN, FULL)[0].smiles for s in variants]
    assert graphs == ["CCO", "CCO", "CCO", "CC(=O)O", "CC(=O)O"]
    _, notes = featurize_noted("COC.CCO", QM9_DOMAIN, FULL)
    assert notes[0].fragments == ("COC",)


def test_neutralisation_names_every_atom_and_keeps_charges_it_cannot_remove() -> None:
    _, notes = featurize_noted("[NH3+]CC(=O)[O-]", QM9_DOMAIN, FULL)
    assert notes[0].kind == "charges_neutralized"
    assert notes[0].atoms == (AtomChange(0, "N", 1, 0), AtomChange(4, "O", -1, 0))
    # a quaternary ammonium keeps its charge: only the counter-ion goes
    graph, notes = featurize_noted("C[N+](C)(C)C.[Cl-]", QM9_DOMAIN, FULL)
    assert graph.smiles == "C[N+](C)(C)C" and [n.kind for n in notes] == ["fragments_removed"]
    # neutralisation alone leaves fragments to be refused
    with pytest.raises(InputError, match="2 fragments"):
        featurize("C[NH3+].[Cl-]", QM9_DOMAIN, Standardization(("neutralize",)))


def test_isotope_labels_are_removed_only_when_the_policy_says_so() -> None:
    graph, notes = featurize_noted("[13CH3]C([2H])([2H])O", QM9_DOMAIN, FULL)
    same_graph(graph, featurize("CCO", QM9_DOMAIN))
    assert notes[0].kind == "isotopes_removed"
    assert [(a.index, a.element, a.isotope) for a in notes[0].atoms] == [
        (0, "C", 13),
        (2, "H", 2),
        (3, "H", 2),
    ]
    policy = Standardization(("largest_fragment", "neutralize"))
    with pytest.raises(InputError, match="isotope label"):
        featurize("[13CH3]O", QM9_DOMAIN, policy)


@pytest.mark.parametrize("policy", [None, FULL], ids=["no-policy", "full"])
@pytest.mark.parametrize(
    ("smiles", "plain", "centers", "bonds"),
    [
        ("C[C@H](N)O", "CC(N)O", 1, 0),
        ("C[C@@H](N)O", "CC(N)O", 1, 0),
        ("F/C=C/F", "FC=CF", 0, 1),
        ("C[C@@H]1CC[C@H](C)CC1", "CC1CCC(C)CC1", 2, 0),
    ],
)
def test_stereo_is_reported_for_every_model_and_dropped(smiles, plain, centers, bonds, policy):
    graph, notes = featurize_noted(smiles, DRUGLIKE, policy)
    same_graph(graph, featurize(plain, DRUGLIKE))
    (note,) = notes
    assert note.kind == "stereo_ignored"
    assert (note.chiral_centers, note.stereo_bonds) == (centers, bonds)


@pytest.mark.parametrize("smiles", ["CCO", "C[C@H](C)O", "CC=CC", "c1ccccc1"])
def test_inputs_without_changes_have_no_notes(smiles: str) -> None:
    """``[C@H]`` on an atom that is no stereocentre specifies nothing."""
    assert featurize_noted(smiles, QM9_DOMAIN, FULL)[1] == ()
    assert featurize_noted(smiles, QM9_DOMAIN)[1] == ()


def test_stereo_from_a_3d_molblock_is_reported() -> None:
    mol = Chem.AddHs(Chem.MolFromSmiles("C[C@H](N)O"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    graph, notes = featurize_noted(Chem.MolToMolBlock(mol), QM9_DOMAIN)
    same_graph(graph, featurize("CC(N)O", QM9_DOMAIN))
    assert [(n.kind, n.chiral_centers) for n in notes] == [("stereo_ignored", 1)]


def test_counter_ions_do_not_count_against_the_atom_limit_when_they_are_removed() -> None:
    parent = "OC(=O)C1CCCC1O"  # 9 heavy atoms, the QM9 limit
    salt = "[O-]C(=O)C1CCCC1O.[Na+]"
    same_graph(featurize(salt, QM9_DOMAIN, FULL), featurize(parent, QM9_DOMAIN))
    with pytest.raises(InputError, match="10 heavy atoms; this model accepts at most 9"):
        featurize(salt, QM9_DOMAIN)
    with pytest.raises(InputError, match="reads at most 18"):
        featurize("C" * 19, QM9_DOMAIN, FULL)
    with pytest.raises(InputError, match="10 heavy atoms; this model accepts at most 9"):
        featurize("CCCCCCCCCC.[Na+]", QM9_DOMAIN, FULL)  # the parent itself is too large


def _model_dir(tmp_path: Path, standardize: object) -> Path:
    """qm9-vae's description with ``input.standardize`` set (no networks: engine None)."""
    target = tmp_path / "qm9-std"
    target.mkdir()
    shutil.copy(QM9_VAE / "projection.json", target)
    spec = json.loads((QM9_VAE / "model.json").read_text())
    spec["name"] = "qm9-std"
    if standardize is not None:
        spec["input"]["standardize"] = standardize
    (target / "model.json").write_text(json.dumps(spec))
    return target


def test_the_model_reads_its_policy_and_a_request_can_turn_it_off(tmp_path: Path) -> None:
    from quotient_models.molecules.model import load_molecule_model

    model = load_molecule_model(_model_dir(tmp_path, ["largest_fragment", "neutralize"]), None)
    assert [n for n, _ in model.standardization()] == ["largest_fragment", "neutralize"]
    item, notes = model.prepare_noted(b"CC(=O)[O-].[Na+]", InputLimits())
    parent = model.prepare(b"CC(=O)O", InputLimits())
    np.testing.assert_array_equal(item, parent)
    assert [n.kind for n in notes] == ["fragments_removed", "charges_neutralized"]
    with pytest.raises(InputError, match="2 fragments"):
        model.prepare_noted(b"CC(=O)[O-].[Na+]", InputLimits(), PrepareOptions(standardize=False))
    # stereo is reported with standardisation off too
    _, notes = model.prepare_noted(b"C[C@H](N)O", InputLimits(), PrepareOptions(False))
    assert [n.kind for n in notes] == ["stereo_ignored"]


def test_a_model_without_the_key_standardises_nothing(tmp_path: Path) -> None:
    from quotient_models.molecules.model import load_molecule_model

    model = load_molecule_model(_model_dir(tmp_path, None), None)
    assert model.standardization() == []
    with pytest.raises(InputError, match="2 fragments"):
        model.prepare(b"CC(=O)[O-].[Na+]", InputLimits())


def test_an_unknown_step_in_model_json_names_the_model(tmp_path: Path) -> None:
    from quotient_models.molecules.model import load_molecule_model

    with pytest.raises(ValueError, match=r"model 'qm9-std': .*unknown steps"):
        load_molecule_model(_model_dir(tmp_path, ["desalt"]), None)
