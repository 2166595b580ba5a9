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
        includes = [str(root), os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]
        try:  # google/rpc/status.proto ships with googleapis-common-protos
            import google.rpc

            includes.append(str(Path(google.rpc.__path__[0]).parent.parent))
        except ImportError:
            pass
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
    """Put the .proto files into the sdist (as ./protos) so that it builds outside the repo."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = _proto_root()
        target = Path(base_dir) / "protos" / "quotient" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for proto in sorted((root / "quotient" / "v1").glob("*.proto")):
            shutil.copy2(proto, target / proto.name)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos})
