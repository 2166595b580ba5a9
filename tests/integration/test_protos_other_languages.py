"""protos/ stands on its own for clients in other languages: ``protoc`` and ``grpc_tools`` compile
it with only protos/ on the include path, ``buf lint`` is clean, and a stock Node.js grpc-js
client (examples/node) that loads protos/ at run time embeds a molecule, over plaintext and over
TLS with an API key, and gets the Python client's numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quotient_client import Client

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
NODE_EXAMPLE = REPO / "examples" / "node"
BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"


def all_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def need(tool: str | Path, install: str) -> str:
    found = shutil.which(str(tool))
    if found is None:
        pytest.fail(f"{tool} is missing: {install}")
    return found


def test_protoc_compiles_protos_alone(tmp_path: Path) -> None:
    protoc = need("protoc", "Debian protobuf-compiler (make test installs it)")
    for lang in ("cpp", "java", "python"):
        (tmp_path / lang).mkdir()
    subprocess.run(
        [protoc, f"-I{PROTOS}", f"--cpp_out={tmp_path / 'cpp'}", f"--java_out={tmp_path / 'java'}",
         f"--python_out={tmp_path / 'python'}", *all_protos()],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (tmp_path / "cpp" / "quotient" / "v1" / "embedding_service.pb.cc").is_file()
    assert (tmp_path / "cpp" / "google" / "rpc" / "error_details.pb.cc").is_file()


def test_grpc_tools_compiles_protos_alone(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *all_protos()],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "quotient" / "v1" / "embedding_service_pb2_grpc.py").is_file()


def test_the_vendored_google_protos_carry_their_licence() -> None:
    licence = (PROTOS / "google" / "rpc" / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    for proto in (PROTOS / "google" / "rpc").glob("*.proto"):
        assert "Licensed under the Apache License, Version 2.0" in proto.read_text(), proto


def test_buf_lint_is_clean() -> None:
    buf = need(BUF, "make test installs @bufbuild/buf into .tools/")
    result = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def node_embed(target: str, smiles: str, env: dict[str, str] | None = None) -> dict:
    node = need("node", "Node.js 18+")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node has no node_modules: make test runs `npm ci` there")
    result = subprocess.run(
        [node, str(NODE_EXAMPLE / "embed_molecule.js"), target, smiles, "qm9-vae"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def real_models(start_service):
    return start_service(model_store="model_store/models")


def test_a_node_grpc_js_client_embeds_a_molecule(real_models) -> None:
    reply = node_embed(real_models.target, "OCC")
    assert reply["model"] == "qm9-vae" and reply["invariant"] is True
    assert reply["request_id"] == "node-1"
    with Client(real_models.target) as client:
        expected = client.embed_molecules(["C(O)C"], model="qm9-vae")[0]  # renumbered ethanol
    assert reply["dimension"] == expected.size
    np.testing.assert_allclose(np.array(reply["values"], np.float32), expected, rtol=1e-5)


def test_a_node_client_over_tls_with_an_api_key(start_service, pki, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("node-key-1\n")
    service = start_service(
        model_store="model_store/models",
        api_key_file=str(keys),
        tls_cert_file=pki.server_pem,
        tls_key_file=pki.server_key,
    )
    target = f"localhost:{service.port}"
    env = {"QUOTIENT_TLS_CA_FILE": pki.ca_pem, "QUOTIENT_API_KEY": "node-key-1"}
    assert node_embed(target, "CCO", env)["dimension"] > 0
    node = need("node", "Node.js 18+")
    refused = subprocess.run(
        [node, str(NODE_EXAMPLE / "embed_molecule.js"), target, "CCO"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "QUOTIENT_TLS_CA_FILE": pki.ca_pem, "QUOTIENT_API_KEY": ""},
    )  # fmt: skip
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
