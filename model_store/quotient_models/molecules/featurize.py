"""SMILES ↔ heavy-atom graphs: the molecule model's input policy and its decoding back to SMILES.

A molecule is embedded as a graph of its heavy atoms (hydrogens become a per-atom count):

- per atom: element, formal charge, total hydrogen count, and a *symmetry slot*;
- per atom pair: bond type, 0 none, 1 single, 2 double, 3 triple, 4 aromatic (RDKit's
  aromaticity model, so that the graph does not depend on a Kekulé structure, which itself depends
  on the atom numbering).

Symmetry slots. Atoms that RDKit's canonical ranking cannot tell apart (symmetric atoms: the
carbons of benzene, the two ends of butane) get identical latents from any permutation-equivariant
encoder, and then no permutation-equivariant decoder can say which of them are bonded. The slot
breaks these ties canonically: 0 for an atom whose symmetry class has one member, and for a class
of k atoms 0..k-1 in the order of RDKit's tie-broken canonical ranks. The slots depend on the
molecule, not on the numbering (up to an automorphism, which leaves the molecule unchanged), so
the embedding stays invariant and symmetric molecules become decodable.

Stereochemistry and isotopes are not part of the graph: stereo marks are dropped (the canonical
SMILES returned is non-isomeric; ``featurize_noted`` reports when the input had any) and isotope
labels are refused unless the model's standardisation removes them. A model's standardisation
(``standardize.Standardization``: largest fragment, neutralisation, isotope labels) runs between
parsing and the graph, in ``featurize_noted``.

What the model accepts (maximum heavy atoms, elements, charges, hydrogens per atom) is a
``MoleculeDomain`` stored in the model's model.json, not a constant of this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quotient_models.errors import InputError
from quotient_models.molecules.standardize import Standardization, ignored_stereo
from quotient_models.notes import InputNote

__all__ = [
    "BOND_NAMES",
    "COLOUR_KEY",
    "SORT_KEYS",
    "TYPE_KEY",
    "DecodedMolecule",
    "MolGraph",
    "MoleculeDomain",
    "canonical_smiles",
    "collate_graphs",
    "colour_ranks",
    "decode_graph",
    "featurize",
    "featurize_noted",
    "is_molblock_text",
    "key_coordinates",
    "mol_to_graph",
    "parse_molblock",
    "parse_smiles",
    "parse_text",
    "type_coordinates",
]

BOND_NAMES = ("none", "single", "double", "triple", "aromatic")
_PT = None  # RDKit periodic table, created on first use


def _chem() -> Any:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]  # reasons, not log lines
    return Chem


def _symbol(z: int) -> str:
    global _PT
    if _PT is None:
        _PT = _chem().GetPeriodicTable()
    return str(_PT.GetElementSymbol(int(z)))


def _atomic_number(symbol: str) -> int:
    global _PT
    if _PT is None:
        _PT = _chem().GetPeriodicTable()
    return int(_PT.GetAtomicNumber(symbol))


@dataclass(frozen=True)
class MoleculeDomain:
    """The inputs a molecule model accepts; stored as model.json's ``domain``."""

    max_atoms: int
    elements: tuple[str, ...]
    charges: tuple[int, ...]
    max_hydrogens: int

    @property
    def symmetry_slots(self) -> int:
        return self.max_atoms

    def to_json(self) -> dict[str, Any]:
        return {
            "max_atoms": self.max_atoms,
            "elements": list(self.elements),
            "charges": list(self.charges),
            "max_hydrogens": self.max_hydrogens,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MoleculeDomain:
        return cls(
            max_atoms=int(raw["max_atoms"]),
            elements=tuple(str(e) for e in raw["elements"]),
            charges=tuple(int(c) for c in raw["charges"]),
            max_hydrogens=int(raw["max_hydrogens"]),
        )

    def describe(self) -> str:
        charges = ", ".join(f"{c:+d}" if c else "0" for c in self.charges)
        return (
            f"at most {self.max_atoms} heavy atoms; elements {', '.join(self.elements)}; "
            f"formal charges {charges}; at most {self.max_hydrogens} hydrogens per atom"
        )


@dataclass(frozen=True)
class MolGraph:
    """A heavy-atom graph in the input's atom order (raw values, not vocabulary indices)."""

    atomic_numbers: np.ndarray  # [n] int
    charges: np.ndarray  # [n] int
    hydrogens: np.ndarray  # [n] int
    symmetry: np.ndarray  # [n] int, symmetry slot (module docstring)
    bonds: np.ndarray  # [n, n] int8, symmetric, codes of BOND_NAMES
    smiles: str  # canonical, non-isomeric

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)

    def permuted(self, perm: np.ndarray) -> MolGraph:
        """The same graph with atom i of the result being atom perm[i] of this one."""
        p = np.asarray(perm)
        return MolGraph(
            self.atomic_numbers[p],
            self.charges[p],
            self.hydrogens[p],
            self.symmetry[p],
            self.bonds[np.ix_(p, p)],
            self.smiles,
        )


# Cheap bounds, checked before RDKit parses anything: RDKit's cost grows with what the text
# declares, not with its length ("C" * 1_000_000 took 11 s and kept 930 MB; a 119-byte V3000 block
# declaring COUNTS 100000000 made it allocate 3.1 GB). Without a domain (training, tools) these
# generous limits apply.
MAX_ATOMS_WITHOUT_DOMAIN = 1000
_CHARS_PER_ATOM = 64  # a bracket atom with isotope, charge, map number, bonds and ring closures
_SMILES_ATOM = re.compile(r"\[[^\]]*\]|Br|Cl|[BCNOPSFIbcnops*]")
_BRACKET_HYDROGEN = re.compile(r"\[\d*H(?![a-z])")  # [H], [2H], [H+]; not [Hg], [Ho]


# A model that keeps the largest fragment reads texts of up to this many times its max_atoms: the
# counter-ions and solvents it removes come on top of the parent's atoms.
FRAGMENT_READ_FACTOR = 2


def _atom_limit(domain: MoleculeDomain | None, fragments: bool = False) -> int:
    if domain is None:
        return MAX_ATOMS_WITHOUT_DOMAIN
    return domain.max_atoms * (FRAGMENT_READ_FACTOR if fragments else 1)


def _accepts(domain: MoleculeDomain | None, fragments: bool) -> str:
    limit = _atom_limit(domain, fragments)
    if domain is None or not fragments:
        return f"this model accepts at most {limit}"
    return (
        f"this model reads at most {limit} (twice its {domain.max_atoms}, for the fragments its "
        "standardisation removes)"
    )


def _check_smiles_cost(text: str, domain: MoleculeDomain | None, fragments: bool = False) -> None:
    limit = _atom_limit(domain, fragments)
    if len(text) > _CHARS_PER_ATOM * limit + 64:
        raise InputError(
            f"SMILES of {len(text)} characters is longer than any molecule of at most {limit} "
            f"heavy atoms ({_CHARS_PER_ATOM * limit + 64} characters)"
        )
    heavy = sum(1 for m in _SMILES_ATOM.finditer(text) if not _BRACKET_HYDROGEN.match(m.group()))
    if heavy > limit:
        raise InputError(f"{heavy} heavy atoms; {_accepts(domain, fragments)}")


def _check_molblock_cost(
    lines: list[str], domain: MoleculeDomain | None, fragments: bool = False
) -> None:
    """The counts a MolBlock declares, against its own length and the model's limit (hydrogens
    may be explicit atoms, so up to ``max_hydrogens`` per heavy atom)."""
    if len(lines) < 4:
        raise InputError(f"MolBlock has {len(lines)} lines; a header and a counts line come first")
    counts = lines[3]
    if "V3000" in counts:
        found = next((ln for ln in lines if ln.startswith("M  V30 COUNTS")), None)
        if found is None:
            raise InputError("V3000 MolBlock has no 'M  V30 COUNTS' line")
        fields = found.split()[3:5]
        where = "its COUNTS line"
    else:
        fields = [counts[0:3], counts[3:6]]
        where = "its counts line"
    try:
        atoms, bonds = (int(f) for f in fields)
    except ValueError:
        raise InputError(f"MolBlock: {where} does not start with atom and bond counts") from None
    hydrogens = 4 if domain is None else domain.max_hydrogens
    limit = _atom_limit(domain, fragments) * (1 + hydrogens)
    if atoms > limit:
        raise InputError(
            f"MolBlock declares {atoms} atoms in {where}; at most {limit} "
            f"({_atom_limit(domain, fragments)} heavy atoms with up to {hydrogens} hydrogens each)"
        )
    if atoms < 0 or bonds < 0 or atoms + bonds > len(lines):
        raise InputError(
            f"MolBlock declares {atoms} atoms and {bonds} bonds in {where} but has only "
            f"{len(lines)} lines"
        )


def parse_smiles(
    smiles: str, domain: MoleculeDomain | None = None, *, fragments: bool = False
) -> Any:
    """SMILES → sanitised RDKit molecule (stereo perceived, not removed: ``featurize_noted``
    reports and drops it), or InputError with the reason. ``fragments``: the text may hold
    fragments that standardisation removes, so up to ``FRAGMENT_READ_FACTOR`` times the domain's
    atoms are read."""
    chem = _chem()
    text = smiles.strip()
    if not text:
        raise InputError("empty SMILES")
    _check_smiles_cost(text, domain, fragments)
    for k, ch in enumerate(text):
        if not ch.isascii() or not ch.isprintable():
            raise InputError(
                f"SMILES has the character {ch!r} (U+{ord(ch):04X}) at position {k}; "
                "SMILES is printable ASCII"
            )
        if ch.isspace():  # RDKit would silently read everything after it as a name
            raise InputError(
                f"SMILES has whitespace at position {k}; send one SMILES without spaces "
                "(a name after it is not read)"
            )
    mol = chem.MolFromSmiles(text, sanitize=False)
    if mol is None:
        raise InputError(f"unparsable SMILES {_clip(text)!r}")
    return _sanitized(mol)


def _sanitized(mol: Any) -> Any:
    chem = _chem()
    try:
        chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several types (valence, kekulisation, ...)
        raise InputError(f"not a valid molecule: {_first_line(exc)}") from None
    for bond in mol.GetBonds():  # before RemoveHs, which crashes on some of the others
        _bond_code(bond)
    # stereo from SMILES marks, MolBlock wedges or 3D coordinates; cleanIt drops marks on atoms
    # and bonds that are no stereo elements, so only what the input specified is reported
    chem.AssignStereochemistry(mol, cleanIt=True, force=True)
    return mol


_MOLBLOCK_END = "M  END"


def parse_molblock(
    text: str, domain: MoleculeDomain | None = None, *, fragments: bool = False
) -> Any:
    """MDL MolBlock (V2000 or V3000) or one SDF record → sanitised RDKit molecule (stereo
    perceived as ``parse_smiles``, coordinates ignored, explicit hydrogens folded into counts
    later), or InputError with the reason. An SDF record's data items after ``M  END`` are
    ignored; several records are refused (one molecule per input). ``fragments`` as for
    ``parse_smiles``."""
    chem = _chem()
    if not text.strip():
        raise InputError("empty MolBlock")
    records: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip() == "$$$$":
            records.append([])
        else:
            records[-1].append(line)
    records = [r for r in records if "".join(r).strip()]
    if not records:
        raise InputError("SDF text holds no record (only '$$$$' lines)")
    if len(records) > 1:
        raise InputError(f"SDF text holds {len(records)} records; send one molecule per input")
    lines = records[0]
    ends = [k for k, line in enumerate(lines) if line.rstrip() == _MOLBLOCK_END]
    if not ends:
        raise InputError(f"not a MolBlock: no {_MOLBLOCK_END!r} line")
    if len(ends) > 1:
        raise InputError(
            f"text holds {len(ends)} MolBlocks ({_MOLBLOCK_END!r} lines); "
            "send one molecule per input"
        )
    _check_molblock_cost(lines[: ends[0] + 1], domain, fragments)
    block = "\n".join(lines[: ends[0] + 1]) + "\n"
    mol = chem.MolFromMolBlock(block, sanitize=False, removeHs=False)
    if mol is None:
        raise InputError("RDKit cannot read the MolBlock (malformed counts, atom or bond lines)")
    return _sanitized(mol)


def is_molblock_text(text: str) -> bool:
    """The molecule input contract's one format rule: text with a line break (surrounding
    whitespace aside) is a MolBlock / SDF record; a SMILES never has one."""
    return "\n" in text.strip()


def parse_text(text: str, domain: MoleculeDomain | None = None, *, fragments: bool = False) -> Any:
    """The molecule model's text input → RDKit molecule: a MolBlock/SDF record or a SMILES, as
    ``is_molblock_text`` says; ``domain`` bounds what may be parsed at all (``fragments`` as for
    ``parse_smiles``)."""
    if is_molblock_text(text):
        return parse_molblock(text, domain, fragments=fragments)
    return parse_smiles(text, domain, fragments=fragments)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_BOND_CODES = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "AROMATIC": 4}


def _bond_code(bond: Any) -> int:
    """The graph's code of a bond, or InputError naming it. By bond type, not order: a dative
    bond (``->``) has order 1 but is no single bond."""
    kind = str(bond.GetBondType())
    if kind not in _BOND_CODES:  # first: a query bond "~" in a ring may be flagged aromatic
        ends = f"{bond.GetBeginAtom().GetSymbol()}-{bond.GetEndAtom().GetSymbol()}"
        raise InputError(
            f"bond {bond.GetIdx()} ({ends}) is {kind.lower()}; only single, double, triple "
            "and aromatic bonds are supported"
        )
    return 4 if bond.GetIsAromatic() else _BOND_CODES[kind]


def _symmetry_slots(mol: Any) -> np.ndarray:
    chem = _chem()
    classes = np.array(list(chem.CanonicalRankAtoms(mol, breakTies=False, includeChirality=False)))
    ranks = np.array(list(chem.CanonicalRankAtoms(mol, breakTies=True, includeChirality=False)))
    slots = np.zeros(len(ranks), dtype=np.int64)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        slots[members[np.argsort(ranks[members])]] = np.arange(len(members))
    return slots


def _check_domain(a: Any, where: str, domain: MoleculeDomain) -> None:
    if a.GetSymbol() not in domain.elements:
        raise InputError(
            f"element {a.GetSymbol()} is outside this model's domain ({', '.join(domain.elements)})"
        )
    if a.GetFormalCharge() not in domain.charges:
        allowed = ", ".join(f"{c:+d}" if c else "0" for c in domain.charges)
        raise InputError(f"{where} has formal charge {a.GetFormalCharge():+d}; allowed: {allowed}")
    if a.GetTotalNumHs() > domain.max_hydrogens:
        raise InputError(
            f"{where} has {a.GetTotalNumHs()} hydrogens; at most {domain.max_hydrogens} allowed"
        )


def mol_to_graph(mol: Any, domain: MoleculeDomain | None = None) -> MolGraph:
    """RDKit molecule → heavy-atom graph; with a domain, refuse what the model cannot embed."""
    chem = _chem()
    n_frags = len(chem.GetMolFrags(mol))
    if n_frags > 1:
        raise InputError(f"molecule has {n_frags} fragments; one connected molecule is expected")
    try:
        mol = chem.RemoveHs(mol)
    except Exception as exc:  # RemoveHs sanitises again (valence, kekulisation, ...)
        raise InputError(f"not a valid molecule: {_first_line(exc)}") from None
    n = mol.GetNumAtoms()
    if all(a.GetAtomicNum() == 1 for a in mol.GetAtoms()):  # also H2, which RemoveHs keeps
        raise InputError("no heavy atoms")
    if domain is not None and n > domain.max_atoms:
        raise InputError(f"{n} heavy atoms; this model accepts at most {domain.max_atoms}")
    atoms = list(mol.GetAtoms())
    for a in atoms:
        where = f"atom {a.GetIdx()} ({a.GetSymbol()})"
        if domain is not None:
            _check_domain(a, where, domain)
        if a.GetIsotope():
            raise InputError(f"{where} has an isotope label; isotopes are not supported")
        if a.GetNumRadicalElectrons():
            raise InputError(f"{where} has unpaired electrons; radicals are not supported")
    bonds = np.zeros((n, n), dtype=np.int8)
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        bonds[i, j] = bonds[j, i] = _bond_code(b)
    return MolGraph(
        atomic_numbers=np.array([a.GetAtomicNum() for a in atoms], dtype=np.int64),
        charges=np.array([a.GetFormalCharge() for a in atoms], dtype=np.int64),
        hydrogens=np.array([a.GetTotalNumHs() for a in atoms], dtype=np.int64),
        symmetry=_symmetry_slots(mol),
        bonds=bonds,
        smiles=chem.MolToSmiles(mol, isomericSmiles=False),
    )


def featurize(
    text: str,
    domain: MoleculeDomain | None = None,
    standardization: Standardization | None = None,
) -> MolGraph:
    """One client molecule (SMILES, or MolBlock / one SDF record) → graph, or InputError with
    the reason (``featurize_noted`` without the notes)."""
    return featurize_noted(text, domain, standardization)[0]


def featurize_noted(
    text: str,
    domain: MoleculeDomain | None = None,
    standardization: Standardization | None = None,
) -> tuple[MolGraph, tuple[InputNote, ...]]:
    """One client molecule → its graph and what was changed in it or ignored of it: parse,
    standardise (``standardization``; None: nothing), drop the stereochemistry, check the
    domain. The notes are in that order (fragments, charges, isotopes, stereo); none when the
    graph is the input's as sent."""
    policy = standardization or Standardization()
    mol = parse_text(text, domain, fragments="largest_fragment" in policy.steps)
    mol, notes = policy.apply(mol)
    stereo = ignored_stereo(mol)
    graph = mol_to_graph(mol, domain)
    return graph, tuple(notes) + (() if stereo is None else (stereo,))


def canonical_smiles(smiles: str) -> str:
    """The canonical, non-isomeric SMILES the model compares decodings against."""
    return featurize(smiles).smiles


def encode_atoms(graph: MolGraph, domain: MoleculeDomain) -> np.ndarray:
    """Vocabulary indices [n, 4]: element, charge, hydrogens, symmetry slot."""
    elements = [domain.elements.index(_symbol(z)) for z in graph.atomic_numbers]
    charges = [domain.charges.index(int(c)) for c in graph.charges]
    slots = np.minimum(graph.symmetry, domain.symmetry_slots - 1)
    return np.stack([elements, charges, graph.hydrogens, slots], axis=1).astype(np.int64)


TYPE_KEY = ("element", "degree", "hydrogens")
# The sort-key column of an atom's message-passing colour (``colour_ranks``), after TYPE_KEY.
COLOUR_KEY = "colour"
SORT_KEYS = (*TYPE_KEY, COLOUR_KEY)


def _ranks_within(sig: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Each real row's rank among the distinct rows of its molecule, in lexicographic order of
    the rows [B, N, K] (-1 where not real): it depends on the molecule's set of rows only."""
    b, n, _ = sig.shape
    mol, atom = np.nonzero(real)
    rows = np.concatenate([mol[:, None], sig[mol, atom]], axis=1)
    order = np.lexsort(rows.T[::-1])
    new = np.ones(len(order), dtype=np.int64)
    if len(order):
        new[1:] = (rows[order][1:] != rows[order][:-1]).any(axis=1)
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1  # global id, molecules in order
    first = np.full(b, np.iinfo(np.int64).max)
    np.minimum.at(first, mol, ids)
    out = np.full((b, n), -1, dtype=np.int64)
    out[mol, atom] = ids - first[mol]
    return out


def colour_ranks(atoms: np.ndarray, bonds: np.ndarray, rounds: int) -> np.ndarray:
    """Each atom's colour after ``rounds`` rounds of Weisfeiler-Leman refinement [B, N] (-1 in
    padding rows), from the dense batch (``collate_graphs``). The first colour is the atom's input
    row (element, charge, hydrogens, symmetry slot); a round replaces it by the pair (colour,
    multiset of (bond code, neighbour's colour)). Colours are numbered by their rank among the
    molecule's distinct colours, so they depend on the molecule, not on its numbering.

    A message-passing encoder of L <= ``rounds`` layers over the same atom and bond features
    (qm9_vae_v1: sums over bonded neighbours and a mean over the molecule) computes the same
    latent for two atoms of one colour, up to float noise: the colour is a discrete sort key
    under which only atoms with equal latents still tie."""
    atoms = np.asarray(atoms, dtype=np.int64)
    bonds = np.asarray(bonds, dtype=np.int64)
    real = atoms[..., 0] >= 0
    n = atoms.shape[1]
    colour = _ranks_within(atoms[..., :4], real)
    linked = bonds > 0
    width = max(int(linked.sum(axis=-1).max(initial=0)), 1)
    for _ in range(rounds):
        # neighbour (bond code, colour) as one number, largest first, -1 where no bond
        codes = np.where(linked, bonds * n + colour[:, None, :], -1)
        codes = -np.sort(-codes, axis=-1)[..., :width]
        colour = _ranks_within(np.concatenate([colour[..., None], codes], axis=-1), real)
    return colour


def key_coordinates(
    key: Sequence[str],
    atoms: np.ndarray,
    bonds: np.ndarray,
    domain: MoleculeDomain,
    colour_rounds: int = 0,
) -> np.ndarray:
    """The sort-key columns ``key`` (names of SORT_KEYS) of every atom as coordinates [B, N, k]
    in (-1, 1), from the dense batch (``collate_graphs``); 0 in padding rows. A value c of K
    possible ones is written (2c + 1) / K - 1: element index (K: the domain's elements), heavy-atom
    degree (K: max_atoms), hydrogen count (K: max_hydrogens + 1), ``colour_ranks`` after
    ``colour_rounds`` rounds (K: max_atoms). Each depends on the atom and the molecule, not on the
    numbering, so renumbering permutes them with the atoms. Put before every latent row as the
    sort key of the sorted projection, they make it order atoms by them first (discrete: float
    noise cannot reorder them) and by the learned coordinates only where they tie; no projection
    outputs them."""
    real = atoms[..., 0] >= 0
    columns = []
    for name in key:
        if name == "element":
            c, k = atoms[..., 0], len(domain.elements)
        elif name == "degree":
            c, k = (bonds > 0).sum(axis=-1), domain.max_atoms
        elif name == "hydrogens":
            c, k = atoms[..., 2], domain.max_hydrogens + 1
        elif name == COLOUR_KEY:
            c, k = colour_ranks(atoms, bonds, colour_rounds), domain.max_atoms
        else:
            raise ValueError(f"unknown sort key {name!r}; known: {', '.join(SORT_KEYS)}")
        columns.append((2.0 * c + 1.0) / k - 1.0)
    out = np.stack(columns, axis=-1) if columns else np.zeros((*real.shape, 0))
    return np.where(real[..., None], out, 0.0).astype(np.float32)


def type_coordinates(atoms: np.ndarray, bonds: np.ndarray, domain: MoleculeDomain) -> np.ndarray:
    """Each atom's type (TYPE_KEY: element, heavy-atom degree, hydrogens) as coordinates
    [B, N, 3] (``key_coordinates``)."""
    return key_coordinates(TYPE_KEY, atoms, bonds, domain)


def collate_graphs(graphs: Sequence[MolGraph], domain: MoleculeDomain) -> dict[str, np.ndarray]:
    """Dense padded batch (the wire format): ``atoms`` [B, N, 4] int64 (element, charge,
    hydrogens, symmetry slot; -1 in padding rows) and ``bonds`` [B, N, N] int64 (codes of
    BOND_NAMES), N = the domain's max_atoms."""
    n_max = domain.max_atoms
    atoms = np.full((len(graphs), n_max, 4), -1, dtype=np.int64)
    bonds = np.zeros((len(graphs), n_max, n_max), dtype=np.int64)
    for k, g in enumerate(graphs):
        n = g.n_atoms
        if n > n_max:
            raise InputError(f"{n} heavy atoms; this model accepts at most {n_max}", k)
        atoms[k, :n] = encode_atoms(g, domain)
        bonds[k, :n, :n] = g.bonds
    return {"atoms": atoms, "bonds": bonds}


@dataclass(frozen=True)
class DecodedMolecule:
    """A decoded graph as canonical SMILES, or the reason there is no molecule; ``distance``: how
    far the decoded molecule's embedding is from the one decoded (``MoleculeModel.decode``), None
    where no molecule was re-embedded."""

    smiles: str | None
    reason: str | None = None
    distance: float | None = None


def decode_graph(
    elements: Sequence[str],
    charges: Sequence[int],
    hydrogens: Sequence[int],
    bonds: np.ndarray,
    derive_hydrogens: bool = True,
) -> DecodedMolecule:
    """Graph (element symbols, charges, hydrogen counts, bond codes [n, n]) → canonical SMILES.

    With ``derive_hydrogens`` (the default) the hydrogen count of an atom without aromatic bonds
    is not taken from ``hydrogens`` but derived by RDKit from its element, charge and bonds (the
    smallest allowed valence, RDKit's implicit hydrogens): radicals are outside every domain
    (``mol_to_graph`` refuses them), so these counts are determined, and a miscounted one would
    only make a radical (qm9-vae decoded methane as ``[C]``). Aromatic atoms keep ``hydrogens``:
    pyrrole's ``[nH]`` and pyridine's ``n`` have the same bonds."""
    chem = _chem()
    n = len(elements)
    if n == 0:
        return DecodedMolecule(None, "decoded graph has no atoms")
    rw = chem.RWMol()
    aromatic = (np.asarray(bonds) == 4).any(axis=1)
    for i in range(n):
        atom = chem.Atom(_atomic_number(elements[i]))
        atom.SetFormalCharge(int(charges[i]))
        derived = derive_hydrogens and not aromatic[i]
        atom.SetNumExplicitHs(0 if derived else int(hydrogens[i]))
        atom.SetNoImplicit(not derived)
        atom.SetIsAromatic(bool(aromatic[i]))
        rw.AddAtom(atom)
    types = {
        1: chem.BondType.SINGLE,
        2: chem.BondType.DOUBLE,
        3: chem.BondType.TRIPLE,
        4: chem.BondType.AROMATIC,
    }
    for i in range(n):
        for j in range(i + 1, n):
            code = int(bonds[i, j])
            if code:
                rw.AddBond(i, j, types[code])
                if code == 4:
                    rw.GetBondBetweenAtoms(i, j).SetIsAromatic(True)
    mol = rw.GetMol()
    try:
        chem.SanitizeMol(mol)
    except Exception as exc:
        return DecodedMolecule(None, f"decoded graph is not a valid molecule: {_first_line(exc)}")
    n_frags = len(chem.GetMolFrags(mol))
    if n_frags > 1:
        return DecodedMolecule(None, f"decoded graph has {n_frags} disconnected fragments")
    return DecodedMolecule(chem.MolToSmiles(mol, isomericSmiles=False))
