"""Build hook: generate the quotient.v1 gRPC stubs from the repository's protos/ into the wheel,
as the subpackage ``quotient_client.proto`` (not a generic top-level ``quotient`` package that
could clash with another distribution's).

Generated stubs are build output, not source: they are never committed. The .proto files are read
from ../../protos (the repository layout) or from ./protos when building from an sdist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def _proto_root() -> Path:
    for candidate in (HERE.parent.parent / "protos", HERE / "protos"):
        if (candidate / "quotient" / "v1").is_dir():
            return candidate
    raise SystemExit("quotient-client: cannot find protos/quotient/v1 (build from the repository)")


# protoc writes the stubs of protos/quotient/v1 as the Python package quotient.v1; they are moved
# to quotient_client.proto and their imports of one another rewritten to match (the proto package,
# and so every gRPC method path such as /quotient.v1.EmbeddingService/Embed, stays quotient.v1).
STUB_PACKAGE = "quotient_client.proto"
_GENERATED_IMPORT = re.compile(r"^(from|import) quotient\.v1(\b)", re.MULTILINE)
# The gencode of grpcio-tools refuses to import with a protobuf runtime older than the protoc it
# bundles (or of another major version) and with a grpcio older than itself. What it calls is
# much older than that, so the guards are replaced at build time by the ranges the SDK declares
# in pyproject.toml and tests at both ends (tests/integration/test_client_dependency_ranges.py).
_PROTOBUF_GUARD = re.compile(
    r"^from google\.protobuf import runtime_version as _runtime_version\n"
    r"|^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n",
    re.MULTILINE,
)
_GRPC_GUARD = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def _floor(requirement: str) -> str:
    """The lower bound of ``requirement`` in this package's dependencies (pyproject.toml)."""
    found = re.search(rf'"{requirement}>=([0-9.]+)', (HERE / "pyproject.toml").read_text())
    if found is None:
        raise SystemExit(f"quotient-client: pyproject.toml declares no {requirement}>= floor")
    return found.group(1)


def _relax(name: str, text: str) -> str:
    """The generated ``text`` of file ``name`` with its imports moved to STUB_PACKAGE and its
    version guards replaced by the declared floors."""
    text = _GENERATED_IMPORT.sub(rf"\1 {STUB_PACKAGE}\2", text)
    if name.endswith("_pb2.py"):
        text, removed = _PROTOBUF_GUARD.subn("", text)
        if removed not in (0, 2):
            raise SystemExit(f"quotient-client: unexpected protobuf version guard in {name}")
    if name.endswith("_pb2_grpc.py"):
        text = _GRPC_GUARD.sub(f"GRPC_GENERATED_VERSION = '{_floor('grpcio')}'", text)
    return text


class BuildWithStubs(build_py):
    def run(self) -> None:
        import grpc_tools
        from grpc_tools import protoc

        root = _proto_root()
        out = Path(self.build_lib)
        # pip builds in place, so build/lib survives between builds: clear what this build writes,
        # or a module renamed or removed since the last build would still be packed into the wheel
        # (and the top-level quotient/ of builds before the stubs moved).
        for stale in ("quotient", "quotient_client"):
            shutil.rmtree(out / stale, ignore_errors=True)
        super().run()
        # protos/ carries the google/rpc protos it imports; grpc_tools has the well-known types.
        # Only quotient/v1 is generated: google.rpc's modules come from googleapis-common-protos.
        includes = [str(root), os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]
        files = sorted(str(p) for p in (root / "quotient" / "v1").glob("*.proto"))
        target = out.joinpath(*STUB_PACKAGE.split("."))
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "protoc",
                *(f"-I{i}" for i in includes),
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *files,
            ]
            if protoc.main(args) != 0:
                raise SystemExit("quotient-client: protoc failed")
            for generated in sorted((Path(tmp) / "quotient" / "v1").iterdir()):
                text = _relax(generated.name, generated.read_text())
                (target / generated.name).write_text(text)
        (target / "__init__.py").write_text(
            '"""gRPC stubs of the quotient.v1 API, generated from protos/ when this package was '
            'built."""\n'
        )


class SdistWithProtos(sdist):
    """Put protos/ (the API and the google/rpc protos it imports, with their licence) into the
    sdist, so that it builds outside the repository."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = _proto_root()
        for source in sorted(p for p in root.rglob("*") if p.is_file()):
            target = Path(base_dir) / "protos" / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _licence() -> None:
    """The repository's LICENSE, copied next to this file (not committed: one text, one place)
    so that setuptools puts it into the sdist and the wheel's metadata."""
    repo_licence, here = HERE.parent.parent / "LICENSE", HERE / "LICENSE"
    if repo_licence.is_file() and (
        not here.is_file() or here.read_bytes() != repo_licence.read_bytes()
    ):
        shutil.copy2(repo_licence, here)


_licence()
setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos})
