"""SMILES or MolBlock → graph → SMILES: input reasons, round trips, and behaviour under atom
renumbering."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("rdkit")
from rdkit import Chem

from quotient_models.errors import InputError
from quotient_models.molecules.featurize import (
    MoleculeDomain,
    collate_graphs,
    decode_graph,
    featurize,
    mol_to_graph,
)

QM9_DOMAIN = MoleculeDomain(
    max_atoms=9, elements=("C", "N", "O", "F"), charges=(-1, 0, 1), max_hydrogens=4
)
MOLECULES = [
    "CCO",
    "c1ccccc1",
    "CC(C)(C)C",
    "c1cc[nH]c1",
    "[NH3+]CC([O-])=O",
    "C1COCCO1",
    "CCCC",
    "N#CC(O)C=O",
]


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("", "empty SMILES"),
        ("   ", "empty SMILES"),
        ("C1CC", "unparsable SMILES 'C1CC'"),
        ("C(", "unparsable SMILES 'C('"),
        ("CCCCCCCCCC", "10 heavy atoms; this model accepts at most 9"),
        # counted before parsing: RDKit took 11 s and 930 MB for this one
        (
            "C" * 1_000_000,
            "SMILES of 1000000 characters is longer than any molecule of at most 9 heavy atoms "
            "(640 characters)",
        ),
        (
            "[H]C([H])([H])C([H])([H])C([H])([H])CCCCCCC",
            "10 heavy atoms; this model accepts at most 9",
        ),
        ("CCCl", "element Cl is outside this model's domain (C, N, O, F)"),
        ("CC[S]", "element S is outside this model's domain (C, N, O, F)"),
        ("C[N+](C)(C)C.[Cl-]", "molecule has 2 fragments; one connected molecule is expected"),
        ("CC.O", "molecule has 2 fragments; one connected molecule is expected"),
        ("[13CH4]", "atom 0 (C) has an isotope label; isotopes are not supported"),
        ("C[CH2]", "atom 1 (C) has unpaired electrons; radicals are not supported"),
        ("[O-2]", "atom 0 (O) has formal charge -2; allowed: -1, 0, +1"),
        ("[H][H]", "no heavy atoms"),
        (
            "C(C)(C)(C)(C)C",
            "not a valid molecule: Explicit valence for atom # 0 C, 5, is greater than permitted",
        ),
    ],
)
def test_bad_inputs_have_exact_reasons(smiles: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        featurize(smiles, QM9_DOMAIN)
    assert info.value.reason == reason


def test_domain_is_data_not_code() -> None:
    big = MoleculeDomain(
        max_atoms=40, elements=("C", "N", "O", "F", "S", "Cl"), charges=(-1, 0, 1), max_hydrogens=4
    )
    assert MoleculeDomain.from_json(big.to_json()) == big
    assert (
        featurize("CC(=O)Nc1ccc(Cl)cc1S", big).n_atoms == 12
    )  # refused by the QM9 domain, fine here
    with pytest.raises(InputError):
        featurize("CC(=O)Nc1ccc(Cl)cc1S", QM9_DOMAIN)


@pytest.mark.parametrize("smiles", MOLECULES)
def test_graph_decodes_to_the_canonical_smiles(smiles: str) -> None:
    g = featurize(smiles, QM9_DOMAIN)
    symbols = [Chem.GetPeriodicTable().GetElementSymbol(int(z)) for z in g.atomic_numbers]
    back = decode_graph(symbols, g.charges, g.hydrogens, g.bonds)
    assert back.reason is None
    assert (
        back.smiles
        == g.smiles
        == Chem.MolToSmiles(Chem.MolFromSmiles(smiles), isomericSmiles=False)
    )


def test_invalid_decoded_graph_gives_a_reason() -> None:
    bonds = np.array([[0, 3], [3, 0]])
    out = decode_graph(["O", "O"], [0, 0], [0, 0], bonds)
    assert out.smiles is None and "valence" in out.reason
    two = decode_graph(["C", "C"], [0, 0], [4, 4], np.zeros((2, 2), int))
    assert two.smiles is None and two.reason == "decoded graph has 2 disconnected fragments"


def test_decoded_hydrogens_follow_valence_except_on_aromatic_atoms() -> None:
    """A miscounted hydrogen would only make a radical, which no domain holds: methane's carbon
    decoded with 0 hydrogens was ``[C]``. Aromatic atoms keep the count ([nH] vs n)."""
    single = np.zeros((1, 1), int)
    assert decode_graph(["C"], [0], [0], single).smiles == "C"
    assert decode_graph(["N"], [1], [2], single).smiles == "[NH4+]"
    assert decode_graph(["C"], [0], [0], single, derive_hydrogens=False).smiles == "[C]"
    ethene = np.array([[0, 2], [2, 0]])
    assert decode_graph(["C", "C"], [0, 0], [3, 0], ethene).smiles == "C=C"
    g = featurize("c1cc[nH]c1")  # the same bonds as pyrrole's n without H: the count decides
    symbols = ["C" if z == 6 else "N" for z in g.atomic_numbers]
    assert decode_graph(symbols, g.charges, g.hydrogens, g.bonds).smiles == "c1cc[nH]c1"


def _signature(g) -> list:  # type: ignore[no-untyped-def]
    """Isomorphism-invariant description of a labelled graph (atoms with slots, neighbourhoods)."""
    atom = [
        (int(a), int(c), int(h), int(s))
        for a, c, h, s in zip(g.atomic_numbers, g.charges, g.hydrogens, g.symmetry, strict=True)
    ]
    return sorted(
        (atom[i], sorted((atom[j], int(g.bonds[i, j])) for j in np.flatnonzero(g.bonds[i])))
        for i in range(g.n_atoms)
    )


@pytest.mark.parametrize("smiles", MOLECULES)
def test_renumbering_permutes_the_labelled_graph(smiles: str) -> None:
    mol = Chem.MolFromSmiles(smiles)
    base = mol_to_graph(mol)
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm = rng.permutation(mol.GetNumAtoms())
        g = featurize(Chem.MolToSmiles(Chem.RenumberAtoms(mol, perm.tolist()), canonical=False))
        assert g.smiles == base.smiles
        assert _signature(g) == _signature(base)
        direct = mol_to_graph(Chem.RenumberAtoms(mol, perm.tolist()))
        np.testing.assert_array_equal(direct.bonds, base.permuted(perm).bonds)


def test_symmetry_slots_break_ties_of_symmetric_atoms() -> None:
    benzene = featurize("c1ccccc1")
    assert sorted(benzene.symmetry.tolist()) == [0, 1, 2, 3, 4, 5]
    butane = featurize("CCCC")
    assert sorted(butane.symmetry.tolist()) == [0, 0, 1, 1]
    assert featurize("N#CC(O)C=O").symmetry.max() == 0  # no symmetric atoms: all slots 0


def test_collate_pads_with_minus_one() -> None:
    arrays = collate_graphs([featurize("CCO"), featurize("c1ccccc1")], QM9_DOMAIN)
    assert arrays["atoms"].shape == (2, 9, 4) and arrays["bonds"].shape == (2, 9, 9)
    assert (arrays["atoms"][0, 3:] == -1).all() and (arrays["atoms"][1, :6] >= 0).all()
    assert (arrays["bonds"][1][:6, :6] == 4).sum() == 12


# --- MolBlock / SDF input ------------------------------------------------------------------


def _molblock(smiles: str, *, v3000: bool = False, hydrogens: bool = False) -> str:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if hydrogens:
        mol = Chem.AddHs(mol)
        AllChem.EmbedMolecule(mol, randomSeed=0)
    return Chem.MolToMolBlock(mol, forceV3000=v3000)


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1O", "C[N+](C)(C)[O-]", "OC(=O)C1CC1"])
@pytest.mark.parametrize("form", ["v2000", "v3000", "explicit_h_3d"])
def test_molblock_gives_the_same_graph_as_smiles(smiles: str, form: str) -> None:
    block = _molblock(smiles, v3000=form == "v3000", hydrogens=form == "explicit_h_3d")
    a, b = featurize(smiles, QM9_DOMAIN), featurize(block, QM9_DOMAIN)
    assert b.smiles == a.smiles
    np.testing.assert_array_equal(b.atomic_numbers, a.atomic_numbers)
    np.testing.assert_array_equal(b.hydrogens, a.hydrogens)
    np.testing.assert_array_equal(b.charges, a.charges)
    np.testing.assert_array_equal(b.bonds, a.bonds)


def test_one_sdf_record_with_data_items_is_accepted() -> None:
    record = _molblock("CC(=O)O") + ">  <name>\nacetic acid\n\n$$$$\n"
    assert featurize(record, QM9_DOMAIN).smiles == "CC(=O)O"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_molblock("CCO") + "$$$$\n" + _molblock("CC") + "$$$$\n", "SDF text holds 2 records"),
        ("\n  RDKit\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\n", "no 'M  END' line"),
        ("title\n\n\n  x  y  garbage\nM  END\n", "counts line does not start with atom and"),
        (
            "title\n\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\nnot an atom\nnor this\n"
            "  1  2  1  0\nM  END\n",
            "RDKit cannot read the MolBlock",
        ),
        # declared counts are checked before RDKit allocates for them (a 119-byte block that
        # declared 100,000,000 atoms made RDKit allocate 3.1 GB)
        (
            "\n  RDKit          3D\n\n  0  0  0  0  0  0  0  0  0  0999 V3000\n"
            "M  V30 BEGIN CTAB\nM  V30 COUNTS 100000000 0 0 0 0\nM  V30 END CTAB\nM  END\n",
            "declares 100000000 atoms in its COUNTS line; at most 45 (9 heavy atoms",
        ),
        ("t\n\n\n 40  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n", "but has only 5 lines"),
        ("t\n\nM  END\n", "MolBlock has 3 lines"),
        (_molblock("CCO.O"), "molecule has 2 fragments"),
        (_molblock("CC[Si]"), "element Si is outside this model's domain"),
        (_molblock("C" * 10), "10 heavy atoms; this model accepts at most 9"),
    ],
)
def test_bad_molblocks_have_exact_reasons(text: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        featurize(text, QM9_DOMAIN)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("CC O", "whitespace at position 2"),  # RDKit would read "O" as a name: ethane
        ("CCO\tethanol", "'\\t' (U+0009) at position 3"),
        ("ＣＣO", "'Ｃ' (U+FF23) at position 0"),  # full-width letters: RDKit read water
        ("N->C", "bond 0 (N-C) is dative"),  # was silently a single bond
        ("COc1cc~ncc1", "is unspecified"),  # was an RDKit valence exception (INTERNAL)
        ("C1=CC=C~N1", "is unspecified"),  # was a kekulisation exception (INTERNAL)
        ("$$$$\n$$$$", "holds no record"),  # was an IndexError (INTERNAL)
    ],
)
def test_input_rdkit_would_misread_or_crash_on_is_refused_with_the_reason(text, reason):
    with pytest.raises(InputError, match=re.escape(reason)):
        featurize(text)
