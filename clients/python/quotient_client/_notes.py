"""``InputNote``: what the server changed in one input, or ignored of it, before embedding it.

A molecule model's standardisation (GetModel's ``InputLimits.standardization``) may keep a salt's
largest fragment, neutralise charges or remove isotope labels, and no model's graph holds
stereochemistry: each such change comes back with the item's embedding, one note per kind
(``Embeddings.notes``, aligned with the rows). An input embedded as sent has no notes.
"""

from __future__ import annotations

from dataclasses import dataclass

from quotient_client.proto import embedding_service_pb2 as pb

__all__ = ["NOTE_KINDS", "AtomChange", "InputNote", "notes_from_proto"]

_KINDS = {
    pb.INPUT_NOTE_KIND_FRAGMENTS_REMOVED: "fragments_removed",
    pb.INPUT_NOTE_KIND_CHARGES_NEUTRALIZED: "charges_neutralized",
    pb.INPUT_NOTE_KIND_ISOTOPES_REMOVED: "isotopes_removed",
    pb.INPUT_NOTE_KIND_STEREO_IGNORED: "stereo_ignored",
}
# the kinds a note may have; "unspecified" is one newer than this client (read its message)
NOTE_KINDS = (*_KINDS.values(), "unspecified")


@dataclass(frozen=True)
class AtomChange:
    """One atom a note is about: ``index`` its position in the input as sent (among the atoms
    of the SMILES, bracket hydrogens included, or of the MolBlock's atom block), from 0; the
    formal charge ``old_charge`` → ``new_charge`` of a neutralised atom; ``isotope`` the mass
    number of a removed isotope label."""

    index: int
    element: str
    old_charge: int = 0
    new_charge: int = 0
    isotope: int = 0


@dataclass(frozen=True)
class InputNote:
    """One change to an input: ``kind`` ("fragments_removed", "charges_neutralized",
    "isotopes_removed", "stereo_ignored"; "unspecified" for a kind newer than this client),
    ``message`` (the change in words) and its details: ``removed_fragments`` (SMILES),
    ``atoms`` (``AtomChange``), ``chiral_centers`` and ``stereo_bonds`` (the stereo the input
    specified)."""

    kind: str
    message: str
    removed_fragments: tuple[str, ...] = ()
    atoms: tuple[AtomChange, ...] = ()
    chiral_centers: int = 0
    stereo_bonds: int = 0

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_proto(cls, note: pb.InputNote) -> InputNote:
        return cls(
            kind=_KINDS.get(note.kind, "unspecified"),
            message=note.message,
            removed_fragments=tuple(note.removed_fragments),
            atoms=tuple(
                AtomChange(a.atom_index, a.element, a.old_charge, a.new_charge, a.isotope)
                for a in note.atoms
            ),
            chiral_centers=note.chiral_centers,
            stereo_bonds=note.stereo_bonds,
        )


def notes_from_proto(response: pb.EmbedResponse) -> tuple[tuple[InputNote, ...], ...]:
    """The notes of each embedding of ``response``, in order."""
    return tuple(tuple(InputNote.from_proto(n) for n in e.notes) for e in response.embeddings)
