"""What preparing one input changed in it, or ignored of it: ``InputNote``s, returned per item.

A model that embeds an input as it was sent returns no notes. A molecule model returns one note
per kind of change its standardisation made (a fragment kept, charges neutralised, isotope labels
removed) and one where the input specified stereochemistry, which the graph does not hold. The
service sends them with the item's embedding (``quotient.v1.InputNote``); nothing here knows
protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CHARGES_NEUTRALIZED",
    "FRAGMENTS_REMOVED",
    "ISOTOPES_REMOVED",
    "NOTE_KINDS",
    "STEREO_IGNORED",
    "AtomChange",
    "InputNote",
]

FRAGMENTS_REMOVED = "fragments_removed"
CHARGES_NEUTRALIZED = "charges_neutralized"
ISOTOPES_REMOVED = "isotopes_removed"
STEREO_IGNORED = "stereo_ignored"
NOTE_KINDS = (FRAGMENTS_REMOVED, CHARGES_NEUTRALIZED, ISOTOPES_REMOVED, STEREO_IGNORED)


@dataclass(frozen=True)
class AtomChange:
    """One atom a note is about. ``index`` is its position in the input as sent, from 0: among
    the atoms of the SMILES (bracket hydrogens such as ``[2H]`` included) or the MolBlock's atom
    block. ``old_charge`` → ``new_charge`` for a neutralised atom; ``isotope`` the mass number
    of a removed isotope label (13 for ``[13C]``), 0 otherwise."""

    index: int
    element: str
    old_charge: int = 0
    new_charge: int = 0
    isotope: int = 0


@dataclass(frozen=True)
class InputNote:
    """One change to (or one thing ignored of) an input: ``kind`` (one of ``NOTE_KINDS``), the
    change in words (``message``), and the details of its kind: ``fragments`` (canonical SMILES
    of the removed fragments), ``atoms`` (the atoms changed), ``chiral_centers`` and
    ``stereo_bonds`` (the stereo elements the input specified)."""

    kind: str
    message: str
    fragments: tuple[str, ...] = ()
    atoms: tuple[AtomChange, ...] = ()
    chiral_centers: int = 0
    stereo_bonds: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NOTE_KINDS:
            raise ValueError(f"unknown note kind {self.kind!r}; known: {', '.join(NOTE_KINDS)}")
