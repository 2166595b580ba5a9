"""Reading the command line's inputs: image files and folders, molecule files, literal SMILES.

Every item gets an ``id`` and a ``source`` (where it came from, for error messages):

- an image file: id = its path as given (inside a folder: the folder as given joined with the
  file's relative path); source = the same path;
- a ``.smi`` / ``.smiles`` line ``SMILES [name]``: id = the name, else ``FILE:LINE``;
- an ``.sdf`` record: id = its title line (or a ``name``/``id`` data field), else ``FILE:LINE`` of
  the record's first line;
- a ``.csv`` row with a ``smiles`` column (case-insensitive): id = its ``name`` or ``id`` column,
  else ``FILE:LINE``;
- ``--smiles TEXT``: id = the text.

A line or record that cannot be read is a ``BadItem`` (source and reason), returned in order with
the good items so the caller can report it and skip it or stop.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "MOLECULE_SUFFIXES",
    "BadItem",
    "Item",
    "read_images",
    "read_molecules",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MOLECULE_SUFFIXES = (".smi", ".smiles", ".sdf", ".csv")
_NAME_COLUMNS = ("name", "id")


@dataclass(frozen=True)
class Item:
    """One input: ``id`` (stored with its vector), ``source`` (``FILE:LINE`` or a path, for
    messages), ``payload`` (an image path, or SMILES / MolBlock text)."""

    id: str
    source: str
    payload: str


@dataclass(frozen=True)
class BadItem:
    """An input that could not be read: where (``source``) and why (``reason``)."""

    source: str
    reason: str


def _images_in(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [
            os.path.join(root, name)
            for name in sorted(files)
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
        ]
    return found


def read_images(inputs: Iterable[str]) -> Iterator[Item | BadItem]:
    """Image files, and the image files of folders (recursively, in name order)."""
    for given in inputs:
        if os.path.isdir(given):
            paths = _images_in(given)
            if not paths:
                yield BadItem(given, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            yield from (Item(p, p, p) for p in paths)
        elif os.path.isfile(given):
            yield Item(given, given, given)
        else:
            yield BadItem(given, "no such file or folder")


def _smi(path: str, text: str) -> Iterator[Item | BadItem]:
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        if number == 1 and fields[0].lower() == "smiles":  # a header line
            continue
        name = fields[1].strip() if len(fields) > 1 else ""
        yield Item(name or f"{path}:{number}", f"{path}:{number}", fields[0])


def _sdf(path: str, text: str) -> Iterator[Item | BadItem]:
    lines = text.splitlines()
    start = 0
    for number, line in enumerate(lines):
        if line.strip() != "$$$$":
            continue
        record = lines[start:number]
        where = f"{path}:{start + 1}"
        if any(r.strip() for r in record):
            yield _sdf_record(record, where)
        start = number + 1
    rest = lines[start:]
    if any(r.strip() for r in rest):
        yield _sdf_record(rest, f"{path}:{start + 1}")


def _sdf_record(record: list[str], where: str) -> Item | BadItem:
    end = next((i for i, r in enumerate(record) if r.strip() == "M  END"), None)
    if end is None:
        return BadItem(where, "SDF record without an 'M  END' line")
    name = record[0].strip()
    for i, line in enumerate(record[end + 1 :], end + 1):  # data fields: > <name>
        tag = line.strip()
        if tag.startswith(">") and "<" in tag and i + 1 < len(record):
            field = tag[tag.index("<") + 1 : tag.rindex(">")].strip().lower()
            if field in _NAME_COLUMNS and not name:
                name = record[i + 1].strip()
    return Item(name or where, where, "\n".join(record[: end + 1]) + "\n")


def _csv(path: str, text: str) -> Iterator[Item | BadItem]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        yield BadItem(f"{path}:1", "empty CSV file")
        return
    lowered = [h.strip().lower() for h in header]
    if "smiles" not in lowered:
        yield BadItem(f"{path}:1", f"no 'smiles' column in the header ({', '.join(header)})")
        return
    column = lowered.index("smiles")
    name_column = next((lowered.index(c) for c in _NAME_COLUMNS if c in lowered), None)
    for row in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{number}"
        if column >= len(row) or not row[column].strip():
            yield BadItem(where, "no SMILES in this row")
            continue
        name = (
            row[name_column].strip() if name_column is not None and name_column < len(row) else ""
        )
        yield Item(name or where, where, row[column].strip())


_READERS = {".smi": _smi, ".smiles": _smi, ".sdf": _sdf, ".csv": _csv}


def read_molecules(inputs: Iterable[str], smiles: Iterable[str] = ()) -> Iterator[Item | BadItem]:
    """Molecule files (.smi, .sdf, .csv), then the literal ``smiles``."""
    for given in inputs:
        suffix = Path(given).suffix.lower()
        reader = _READERS.get(suffix)
        if reader is None:
            yield BadItem(
                given,
                f"not a molecule file (expected {', '.join(MOLECULE_SUFFIXES)}; "
                "use --smiles for a literal SMILES)",
            )
            continue
        try:
            with open(given, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
            yield BadItem(given, f"cannot read: {reason}")
            continue
        yield from reader(given, text)
    for text in smiles:
        yield Item(text, f"--smiles {text}", text)
