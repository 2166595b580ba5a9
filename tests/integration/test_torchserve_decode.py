"""Decode with ``--backend torchserve`` against the embedded backend, for the tiny molecule model:
the same answer through the public API (both run ``handle_payload``). One TorchServe start."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

from quotient_client import Client, InvalidInputError
from quotient_service.config import Settings
from quotient_service.server import create_server

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
def torchserve_target(
    loop_thread, pick_port, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    archives = tmp_path_factory.mktemp("ts-molarchives")
    cmd = [
        sys.executable, "-m", "quotient_models.archive",
        "--model-dir", str(store / MODEL), "--export-path", str(archives),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    grpc_port, grpc_mgmt, http, mgmt, metrics = (pick_port() for _ in range(5))
    settings = Settings(
        port=0, metrics_port=0, backend="torchserve", model_store=str(store),
        archive_dir=str(archives), torchserve_workdir=str(tmp_path_factory.mktemp("ts-decode")),
        torchserve_grpc_port=grpc_port, torchserve_grpc_management_port=grpc_mgmt,
        torchserve_inference_port=http, torchserve_management_port=mgmt,
        torchserve_metrics_port=metrics, torchserve_startup_timeout_s=120.0,
    )  # fmt: skip
    _, port, app = loop_thread.run(create_server(settings))
    try:
        loop_thread.run(app.start(), timeout=settings.torchserve_startup_timeout_s + 30)
        yield f"127.0.0.1:{port}"
    finally:
        loop_thread.run(app.stop(0), timeout=60)


def test_both_backends_decode_alike(start_service, store: Path, torchserve_target: str) -> None:
    embedded = start_service(model_store=str(store)).target
    with Client(embedded) as client:
        values = client.embed_molecules(SMILES, model=MODEL)
        want = client.decode(values, model=MODEL)
    with Client(torchserve_target) as client:
        assert client.decode(values, model=MODEL) == want
        rows = [list(v) for v in values]
        rows[1] = rows[1][:-1]
        with pytest.raises(InvalidInputError) as info:
            client.decode(rows, model=MODEL)
    assert info.value.index == 1 and info.value.field == "embeddings[1].values"
