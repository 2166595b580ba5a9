"""Decode with ``--backend torchserve`` against the embedded backend, for the tiny molecule model:
the same answer through the public API (both run ``handle_payload``). One TorchServe start."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from quotient_client import Client, InvalidInputError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-mol"
SMILES = ["CCO", "OC1CC1", "CC(=O)N", "N#CC(F)=O"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quotient_models.molecules.testing import write_tiny_molecule_model

    root = tmp_path_factory.mktemp("ts-molstore")
    write_tiny_molecule_model(root / MODEL)
    return root


@pytest.fixture(scope="module")
def torchserve_target(torchserve_service_at, store: Path) -> Iterator[str]:
    with torchserve_service_at(store) as target:
        yield target


def test_both_backends_decode_alike(start_service, store: Path, torchserve_target: str) -> None:
    embedded = start_service(model_store=str(store)).target
    with Client(embedded) as client:
        values = client.embed_molecules(SMILES, model=MODEL)
        want = client.decode(values, model=MODEL)
        want_inexact = client.decode(values, model=MODEL, allow_inexact=True)
    # untrained: its decodes do not embed back, so they are refused unless allow_inexact
    assert all(d.smiles is None for d in want)
    assert [d.distance for d in want_inexact] == [d.distance for d in want]
    with Client(torchserve_target) as client:
        assert client.decode(values, model=MODEL) == want
        assert client.decode(values, model=MODEL, allow_inexact=True) == want_inexact
        rows = [list(v) for v in values]
        rows[1] = rows[1][:-1]
        with pytest.raises(InvalidInputError) as info:
            client.decode(rows, model=MODEL)
    assert info.value.index == 1 and info.value.field == "embeddings[1].values"


def test_both_backends_embed_smiles_and_molblocks_alike(
    start_service, store: Path, torchserve_target: str
) -> None:
    from rdkit import Chem

    blocks = [Chem.MolToMolBlock(Chem.MolFromSmiles(s)) for s in SMILES]
    embedded = start_service(model_store=str(store)).target
    with Client(embedded) as client:
        want = client.embed_molecules(SMILES, model=MODEL)
    with Client(torchserve_target) as client:
        got_smiles = client.embed_molecules(SMILES, model=MODEL)
        got_blocks = client.embed_molecules(blocks, model=MODEL)
        with pytest.raises(InvalidInputError) as info:
            client.embed_molecules([blocks[0], blocks[1] + blocks[2]], model=MODEL)
    np.testing.assert_allclose(got_smiles, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_blocks, want, rtol=1e-5, atol=1e-6)
    assert info.value.index == 1 and "text holds 2 MolBlocks" in str(info.value)
    assert info.value.field == "inputs[1].molecule.molblock"
