"""The client's sdist carries the .proto files, so a wheel builds from it outside the repository
(the wheel's stubs are generated at build time, never committed, into quotient_client.proto)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_builds_from_the_sdist_alone(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)],
        cwd=REPO / "clients" / "python",
        check=True,
        capture_output=True,
    )
    (sdist,) = dist.glob("quotient_client-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "src", filter="data")
    for carried in (
        "protos/quotient/v1/embedding_service.proto",
        "protos/google/rpc/status.proto",
        "protos/google/rpc/LICENSE",
    ):
        assert any(n.endswith(carried) for n in names), carried
    assert any(n.count("/") == 1 and n.endswith("/LICENSE") for n in names)  # the top level
    (tree,) = (tmp_path / "src").iterdir()
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(tree)],
        cwd=tmp_path,  # away from the repository, whose protos/ the build would otherwise find
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("quotient_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        built = set(z.namelist())
    assert {
        "quotient_client/proto/__init__.py",
        "quotient_client/proto/embedding_service_pb2.py",
        "quotient_client/proto/embedding_service_pb2.pyi",
        "quotient_client/proto/embedding_service_pb2_grpc.py",
        "quotient_client/_client.py",
    } <= built
    # The stubs live inside the SDK's package: no generic top-level "quotient" package to clash.
    assert {n.split("/")[0] for n in built if not n.split("/")[0].endswith(".dist-info")} == {
        "quotient_client"
    }
    with zipfile.ZipFile(wheel) as z:
        grpc_stub = z.read("quotient_client/proto/embedding_service_pb2_grpc.py").decode()
    assert "from quotient_client.proto import embedding_service_pb2" in grpc_stub
    assert "quotient.v1 import" not in grpc_stub
    assert "/quotient.v1.EmbeddingService/Embed" in grpc_stub  # the API's name is unchanged
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in built)
    assert not any(n.startswith("google/") for n in built)  # googleapis-common-protos has them


def test_the_installed_sdk_has_no_top_level_quotient_package() -> None:
    import importlib.util

    from quotient_client.proto import embedding_service_pb2 as pb

    assert importlib.util.find_spec("quotient") is None
    assert pb.DESCRIPTOR.package == "quotient.v1"  # the wire names are those of the API
