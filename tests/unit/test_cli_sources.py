"""The command line's input readers: ids and sources of images and molecule files, bad items."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotient_client._sources import BadItem, Item, read_images, read_molecules

ETHANOL_MOLBLOCK = """ethanol
     RDKit          2D

  3  2  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.2990    0.7500    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    2.5981   -0.0000    0.0000 O   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  2  3  1  0
M  END
"""


def test_image_ids_are_paths_as_given_and_folders_are_walked_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    for name in ("cat/b.png", "cat/a.JPG", "cat/sub/c.webp", "cat/notes.txt", "one.png"):
        (tmp_path / name).write_bytes(b"x")
    items = list(read_images(["one.png", "cat", "missing.png"]))
    assert [i.id for i in items[:-1]] == ["one.png", "cat/a.JPG", "cat/b.png", "cat/sub/c.webp"]
    assert items[-1] == BadItem("missing.png", "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert isinstance(next(read_images(["empty"])), BadItem)


def test_smi_lines_give_names_or_file_and_line(tmp_path):
    smi = tmp_path / "lib.smi"
    smi.write_text("SMILES Name\nCCO ethanol\n\n# a comment\nc1ccccc1\nCC(=O)O acetic acid\n")
    items = list(read_molecules([str(smi)]))
    assert items == [
        Item("ethanol", f"{smi}:2", "CCO"),
        Item(f"{smi}:5", f"{smi}:5", "c1ccccc1"),
        Item("acetic acid", f"{smi}:6", "CC(=O)O"),
    ]


def test_sdf_records_are_named_by_title_or_name_field(tmp_path):
    untitled = "\n" + ETHANOL_MOLBLOCK.split("\n", 1)[1]
    sdf = tmp_path / "lib.sdf"
    sdf.write_text(
        ETHANOL_MOLBLOCK
        + "$$$$\n"
        + untitled
        + "> <name>\nsecond\n\n$$$$\n"
        + untitled
        + "$$$$\n"
        + "broken\n  no counts\n$$$$\n"
    )
    items = list(read_molecules([str(sdf)]))
    assert [getattr(i, "id", None) for i in items[:3]] == ["ethanol", "second", f"{sdf}:26"]
    assert items[0].payload.endswith("M  END\n") and "$$$$" not in items[0].payload
    assert items[3] == BadItem(f"{sdf}:37", "SDF record without an 'M  END' line")


def test_csv_needs_a_smiles_column_and_reports_empty_rows(tmp_path):
    good = tmp_path / "lib.csv"
    good.write_text('id,SMILES,value\nm1,CCO,1\nm2,,2\n,"C(=O)O",3\n')
    items = list(read_molecules([str(good)]))
    assert items == [
        Item("m1", f"{good}:2", "CCO"),
        BadItem(f"{good}:3", "no SMILES in this row"),
        Item(f"{good}:4", f"{good}:4", "C(=O)O"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,formula\nwater,H2O\n")
    assert list(read_molecules([str(bad)])) == [
        BadItem(f"{bad}:1", "no 'smiles' column in the header (name, formula)")
    ]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("lib.txt", "CCO\n", "not a molecule file"),
        ("missing.smi", None, "cannot read: No such file or directory"),
        ("latin.smi", b"CCO \xe9thanol\n", "not UTF-8 text"),
    ],
)
def test_unreadable_molecule_files_are_bad_items(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    (item,) = read_molecules([str(path)])
    assert isinstance(item, BadItem) and item.source == str(path) and reason in item.reason


def test_literal_smiles_come_last_and_are_their_own_id(tmp_path: Path):
    smi = tmp_path / "a.smi"
    smi.write_text("C methane\n")
    assert [i.id for i in read_molecules([str(smi)], ["CCO"])] == ["methane", "CCO"]
