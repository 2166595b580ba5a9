"""Build hook: generate the quotient.v1 gRPC stubs from the repository's protos/ into the wheel.

Generated stubs are build output, not source: they are never committed. The .proto files are read
from ../../protos (the repository layout) or from ./protos when building from an sdist.
"""

from __future__ import annotations

import os
import shutil
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


class BuildWithStubs(build_py):
    def run(self) -> None:
        import grpc_tools
        from grpc_tools import protoc

        root = _proto_root()
        out = Path(self.build_lib)
        # pip builds in place, so build/lib survives between builds: clear what this build writes,
        # or a module renamed or removed since the last build would still be packed into the wheel.
        for stale in ("quotient", "quotient_client"):
            shutil.rmtree(out / stale, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        # protos/ carries the google/rpc protos it imports; grpc_tools has the well-known types.
        # Only quotient/v1 is generated: google.rpc's modules come from googleapis-common-protos.
        includes = [str(root), os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]
        files = sorted(str(p) for p in (root / "quotient" / "v1").glob("*.proto"))
        args = [
            "protoc",
            *(f"-I{i}" for i in includes),
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("quotient-client: protoc failed")
        for pkg in (out / "quotient", out / "quotient" / "v1"):
            (pkg / "__init__.py").touch()
        super().run()


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
