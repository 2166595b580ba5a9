"""A molecule model's standardisation policy, and the stereochemistry its graphs leave out.

Chemistry services standardise what clients send before computing anything from it (ChEMBL's
structure pipeline, PubChem's standardisation): a salt, a solvate or a mixture becomes its parent
molecule, charges that only say how the molecule was protonated are neutralised. Here that is a
model's policy, a list of steps in its model.json:

    "input": {"standardize": ["largest_fragment", "neutralize", "strip_isotopes"]}

- ``largest_fragment``: keep the largest fragment, organic ones first (RDKit MolStandardize
  ``LargestFragmentChooser(preferOrganic=True)``: by atom count, ties by molecular weight, then
  by SMILES, so the choice does not depend on the atom numbering);
- ``neutralize``: neutralise charged atoms where adding or removing hydrogens can (RDKit
  MolStandardize ``Uncharger``); a quaternary nitrogen or a nitro group keeps its charges;
- ``strip_isotopes``: remove isotope labels (``[13C]`` becomes C, ``[2H]`` a hydrogen): the graph
  has no isotopes, so a labelled compound embeds as its unlabelled parent. Opt-in, as isotopes
  may be what tells two inputs apart; without it a label is refused.

The steps run in this order whatever the order listed. A model.json without the key
standardises nothing: a molecule of several fragments, and an isotope label, are refused.
Every change is reported as an ``InputNote`` naming the atoms by their index in the input.

Stereochemistry is not standardisation: no model's graph holds it, so it is dropped from every
input, and ``ignored_stereo`` says when the input specified any (chiral centres, double-bond
configurations). The embedding of ``C[C@H](N)O`` is that of ``CC(N)O``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quotient_models.errors import InputError
from quotient_models.notes import (
    CHARGES_NEUTRALIZED,
    FRAGMENTS_REMOVED,
    ISOTOPES_REMOVED,
    STEREO_IGNORED,
    AtomChange,
    InputNote,
)

__all__ = ["STEPS", "Standardization", "ignored_stereo"]

# step name (model.json) → what it does, in words (GetModel)
STEPS = {
    "largest_fragment": (
        "keeps the largest organic fragment (RDKit MolStandardize LargestFragmentChooser, "
        "preferOrganic): salts, solvents and mixtures lose their other fragments"
    ),
    "neutralize": (
        "neutralises charged atoms where adding or removing hydrogens can (RDKit MolStandardize "
        "Uncharger); quaternary nitrogen and nitro groups keep their charges"
    ),
    "strip_isotopes": "removes isotope labels ([13C] becomes C, [2H] a hydrogen)",
}
_INDEX = "_quotient_input_index"  # atom property: the atom's index in the input as parsed


def _chem() -> Any:
    from rdkit import Chem

    return Chem


@dataclass(frozen=True)
class Standardization:
    """The steps a model applies to every molecule (model.json ``input.standardize``), in the
    order they run (``STEPS``'s); no steps: inputs are embedded as sent."""

    steps: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, raw: Any) -> Standardization:
        """model.json's ``input.standardize`` (a list of step names; None: no standardisation)."""
        if raw is None:
            return cls()
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise ValueError(
                f"model.json input.standardize must be a list of step names, got {raw!r}"
            )
        unknown = [s for s in raw if s not in STEPS]
        if unknown:
            raise ValueError(
                f"model.json input.standardize: unknown steps {unknown}; known: {', '.join(STEPS)}"
            )
        if len(set(raw)) != len(raw):
            raise ValueError(f"model.json input.standardize lists a step twice: {raw}")
        return cls(tuple(s for s in STEPS if s in raw))

    def to_json(self) -> list[str]:
        return list(self.steps)

    def describe(self) -> list[tuple[str, str]]:
        """(step name, what it does) per step, in the order they run."""
        return [(s, STEPS[s]) for s in self.steps]

    def apply(self, mol: Any) -> tuple[Any, list[InputNote]]:
        """A sanitised molecule → its standardised copy and one note per kind of change made
        (none when nothing changed). Raises ``InputError`` if RDKit cannot standardise it."""
        if not self.steps:
            return mol, []
        mol = _chem().Mol(mol)
        for atom in mol.GetAtoms():
            atom.SetIntProp(_INDEX, atom.GetIdx())
        notes: list[InputNote] = []
        for step, run in (
            ("largest_fragment", _largest_fragment),
            ("neutralize", _neutralize),
            ("strip_isotopes", _strip_isotopes),
        ):
            if step in self.steps:
                try:
                    mol, note = run(mol)
                except InputError:
                    raise
                except Exception as exc:  # RDKit raises several types
                    reason = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
                    raise InputError(f"standardisation ({step}) failed: {reason[0]}") from None
                if note is not None:
                    notes.append(note)
        return mol, notes


def _input_index(atom: Any) -> int:
    return int(atom.GetIntProp(_INDEX)) if atom.HasProp(_INDEX) else int(atom.GetIdx())


def _charge(charge: int) -> str:
    return f"{charge:+d}" if charge else "0"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _largest_fragment(mol: Any) -> tuple[Any, InputNote | None]:
    from rdkit.Chem.MolStandardize import rdMolStandardize

    chem = _chem()
    fragments = chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    if len(fragments) < 2:
        return mol, None
    kept = rdMolStandardize.LargestFragmentChooser(preferOrganic=True).choose(mol)
    kept_atoms = {_input_index(a) for a in kept.GetAtoms()}
    removed = tuple(
        chem.MolToSmiles(f)
        for f in fragments
        if _input_index(f.GetAtomWithIdx(0)) not in kept_atoms
    )
    message = (
        f"kept the largest organic fragment {chem.MolToSmiles(kept)}; removed "
        f"{_plural(len(removed), 'fragment')}: {', '.join(removed)}"
    )
    return kept, InputNote(FRAGMENTS_REMOVED, message, fragments=removed)


def _neutralize(mol: Any) -> tuple[Any, InputNote | None]:
    from rdkit.Chem.MolStandardize import rdMolStandardize

    before = {_input_index(a): a.GetFormalCharge() for a in mol.GetAtoms()}
    out = rdMolStandardize.Uncharger().uncharge(mol)
    changed = tuple(
        AtomChange(_input_index(a), a.GetSymbol(), before[_input_index(a)], a.GetFormalCharge())
        for a in out.GetAtoms()
        if a.GetFormalCharge() != before[_input_index(a)]
    )
    if not changed:
        return mol, None
    listed = ", ".join(
        f"atom {c.index} ({c.element}) {_charge(c.old_charge)} -> {_charge(c.new_charge)}"
        for c in changed
    )
    message = f"neutralised {_plural(len(changed), 'atom')}: {listed}"
    return out, InputNote(CHARGES_NEUTRALIZED, message, atoms=changed)


def _strip_isotopes(mol: Any) -> tuple[Any, InputNote | None]:
    changed = []
    for atom in mol.GetAtoms():
        if atom.GetIsotope():
            index, element = _input_index(atom), atom.GetSymbol()
            changed.append(AtomChange(index, element, isotope=atom.GetIsotope()))
            atom.SetIsotope(0)
    if not changed:
        return mol, None
    listed = ", ".join(f"atom {c.index} ({c.isotope}{c.element})" for c in changed)
    message = f"removed {_plural(len(changed), 'isotope label')}: {listed}"
    return mol, InputNote(ISOTOPES_REMOVED, message, atoms=tuple(changed))


_NO_STEREO = ("STEREONONE", "STEREOANY")


def ignored_stereo(mol: Any) -> InputNote | None:
    """The note for a molecule whose stereochemistry was specified (perceived with
    ``AssignStereochemistry(cleanIt=True)``, so marks on atoms that are no stereocentres do not
    count), then remove it from ``mol`` in place; None if there was none."""
    chem = _chem()
    centers = sum(a.GetChiralTag() != chem.ChiralType.CHI_UNSPECIFIED for a in mol.GetAtoms())
    bonds = sum(str(b.GetStereo()) not in _NO_STEREO for b in mol.GetBonds())
    chem.RemoveStereochemistry(mol)
    if not centers and not bonds:
        return None
    parts: Sequence[str] = [
        p
        for p in (
            _plural(centers, "chiral centre") if centers else "",
            _plural(bonds, "double-bond configuration") if bonds else "",
        )
        if p
    ]
    message = (
        f"stereochemistry ignored: the input specifies {' and '.join(parts)}; the graph holds "
        "none, so the embedding is that of the molecule without stereochemistry"
    )
    return InputNote(STEREO_IGNORED, message, chiral_centers=centers, stereo_bonds=bonds)
