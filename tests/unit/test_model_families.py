"""Model families: ``runtime.load_model`` finds a model's loader from its model.json (``"family"``,
else ``quotient_models.<modality>s.model``), so a new family needs no edit to runtime.py. A toy
family written to a temporary module is served by ``load_model`` and the embedded backend."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import quotient_models.runtime as runtime
from quotient_models import serving
from quotient_models.images.model import ImageModel
from quotient_models.molecules.model import MoleculeModel
from quotient_models.runtime import InputLimits, load_model
from quotient_models.spec import ModelSpec
from quotient_service.backends.embedded import EmbeddedBackend
from quotient_service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("quotient_models.images", "quotient_models.molecules")

# A permutation-invariant toy: an item is "a,b,c" (three numbers), its embedding the sorted numbers.
TOY_FAMILY = """
import numpy as np

from quotient_models.errors import InputError
from quotient_models.projections import ProjectionInfo, ProjectionOutput
from quotient_models.runtime import EmbeddingModel, InputLimits
from quotient_models.spec import ModelSpec

BATCHES = []


class SetModel(EmbeddingModel):
    def __init__(self, spec, engine):
        self.spec, self.engine = spec, engine

    def projections(self):
        return [ProjectionInfo("sorted", 3, True, "the numbers in increasing order")]

    def prepare(self, data, limits):
        try:
            values = [float(v) for v in data.decode().split(",")]
        except ValueError:
            raise InputError("expected three numbers separated by commas") from None
        if len(values) != 3:
            raise InputError(f"expected three numbers, got {len(values)}")
        return np.asarray(values, np.float32)

    def collate(self, items):
        return {"numbers": np.stack(items)}

    def warmup_inputs(self):
        return [b"0,0,0"]

    def embed_batch(self, arrays, projection=None):
        self.resolve_projection(projection)
        BATCHES.append(len(arrays["numbers"]))
        return ProjectionOutput(np.sort(arrays["numbers"], axis=1))


def load(model_dir, engine="onnx", device="cpu", threads=0):
    return SetModel(ModelSpec.load(model_dir), engine)
"""


def _model_dir(root: Path, name: str, **fields: object) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    spec = {
        "name": name,
        "version": "1.0.0",
        "modality": "set",
        "architecture": "toy_sort_v1",
        "group": {"name": "S3", "order": 6, "description": "permutations of the three numbers"},
        "default_projection": "sorted",
        **fields,
    }
    (directory / "model.json").write_text(json.dumps(spec))
    return directory


@pytest.fixture
def toy_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A family module on sys.path that no file of the repository names."""
    name = f"toy_family_{uuid.uuid4().hex[:8]}"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{name}.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name
    sys.modules.pop(name, None)


def test_a_new_family_loads_through_runtime(tmp_path: Path, toy_family: str) -> None:
    model = load_model(_model_dir(tmp_path, "toy", family=toy_family), engine=None)
    assert type(model).__module__ == toy_family
    assert runtime.family_module(model.spec) == toy_family
    items = [model.prepare(b"3,1,2", InputLimits()), model.prepare(b"1,2,3", InputLimits())]
    out = serving.decode_output(
        serving.handle_payload(model, serving.encode_batch(model.collate(items), "sorted"))
    )
    np.testing.assert_array_equal(out.values, [[1, 2, 3], [1, 2, 3]])
    assert out.poses is None


def test_a_new_family_is_served_by_the_embedded_backend(tmp_path: Path, toy_family: str) -> None:
    _model_dir(tmp_path / "models", "toy", family=toy_family)
    backend = EmbeddedBackend(Settings(model_store=str(tmp_path / "models"), device="cpu"))

    async def embed() -> np.ndarray:
        await backend.start()
        try:
            model = backend.models()["toy"]
            payload = serving.encode_batch(
                model.collate([model.prepare(b"2,-1,0.5", InputLimits())]), "sorted"
            )
            return serving.decode_output(await backend.run("toy", payload)).values
        finally:
            await backend.stop()

    values = asyncio.run(embed())
    np.testing.assert_array_equal(values, [[-1, 0.5, 2]])
    assert sys.modules[toy_family].BATCHES == [1, 1]  # the warm-up batch (its own input), then ours


def test_the_committed_models_find_their_family_by_convention() -> None:
    for name, cls in (("rotmnist-c8", ImageModel), ("qm9-vae", MoleculeModel)):
        spec = ModelSpec.load(ROOT / "model_store" / "models" / name)
        assert "family" not in spec.raw  # archives built before families existed still load
        assert runtime.family_module(spec) == f"quotient_models.{spec.modality}s.model"
        model = load_model(spec.directory, engine=None)
        assert isinstance(model, cls)
        assert model.warmup_inputs()
        model.collate([model.prepare(x, InputLimits()) for x in model.warmup_inputs()])


def test_an_unknown_family_module_is_refused_with_its_name(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, "lost", family="no_such_family_module")
    with pytest.raises(ValueError, match=r"model 'lost'.*'no_such_family_module'.*No module named"):
        load_model(directory, engine=None)


def test_a_modality_without_a_family_names_the_conventional_module(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, "audio-net", modality="audio")
    with pytest.raises(
        ValueError, match=r"model 'audio-net'.*'quotient_models\.audios\.model'.*modality 'audio'"
    ):
        load_model(directory, engine=None)


def test_a_broken_family_module_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"broken_family_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('needs a licence file')\n")
    (tmp_path / f"{name}_noload.py").write_text("LOAD = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"model 'b'.*cannot be imported.*needs a licence file"):
        load_model(_model_dir(tmp_path, "b", family=name), engine=None)
    with pytest.raises(ValueError, match=r"model 'c'.*has no load\(model_dir, engine"):
        load_model(_model_dir(tmp_path, "c", family=f"{name}_noload"), engine=None)
    with pytest.raises(ValueError, match=r"model 'd'.*'family' must name a module"):
        load_model(_model_dir(tmp_path, "d", family=3), engine=None)


def test_runtime_names_no_family() -> None:
    tree = ast.parse(Path(runtime.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [m for m in imported if m and m.startswith(FAMILIES)]
    code = ast.Module(body=tree.body[1:], type_ignores=[])  # without the module docstring
    strings = [n.value for n in ast.walk(code) if isinstance(n, ast.Constant)]
    named = [s for s in strings if s in ("image", "molecule") or any(f in str(s) for f in FAMILIES)]
    assert not named  # no table of modalities or family modules either
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                import quotient_models.runtime
                print([m for m in sys.modules if m.startswith({FAMILIES!r})])
            """),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "[]"
