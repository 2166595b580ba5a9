"""The TorchServe handler driven directly, without TorchServe running (``ts`` is only imported)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ts.utils.util import PredictionException

from quotient_models import serving
from quotient_models.runtime import load_model
from quotient_models.testing import write_tiny_image_model

HANDLER = Path(__file__).resolve().parents[2] / "model_store" / "handlers" / "quotient_handler.py"


def _handler_class() -> type:
    spec = importlib.util.spec_from_file_location("quotient_handler", HANDLER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuotientHandler


class _Metrics:
    def __init__(self) -> None:
        self.times: list[tuple] = []

    def add_time(self, *args, **kwargs) -> None:
        self.times.append(args)


def _context(model_dir: Path, yaml_config: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        system_properties={"model_dir": str(model_dir), "gpu_id": None, "batch_size": 1},
        model_yaml_config=yaml_config or {},
        manifest={"model": {"modelName": "tiny-c4"}},
        metrics=_Metrics(),
        get_request_header=lambda idx, key: None,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_image_model(tmp_path_factory.mktemp("models") / "tiny-c4")


@pytest.fixture(scope="module")
def handler(model_dir: Path):
    h = _handler_class()()
    h.initialize(_context(model_dir))
    return h


def _batch(n: int = 3, projection: str = "align", seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)
    return serving.encode_batch({"image": x}, projection)


def test_the_module_defines_exactly_one_class() -> None:
    # TorchServe's loader refuses a handler module that defines more than one class.
    from ts.utils.util import list_classes_from_module

    spec = importlib.util.spec_from_file_location("quotient_handler", HANDLER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [c.__name__ for c in list_classes_from_module(module)] == ["QuotientHandler"]


@pytest.mark.parametrize("projection", ["align", "maxfilter", "mean", "max", "raw"])
def test_handle_matches_handle_payload_in_process(
    handler, model_dir: Path, projection: str
) -> None:
    payload = _batch(projection=projection)
    want = serving.decode_output(serving.handle_payload(load_model(model_dir, "onnx"), payload))
    [answer] = handler.handle([{"body": bytearray(payload)}], _context(model_dir))
    assert isinstance(answer, bytes)  # bytes, never a tensor (that would be pickled)
    got = serving.decode_output(answer)
    np.testing.assert_array_equal(got.values, want.values)
    if want.poses is None:
        assert got.poses is None
    else:
        np.testing.assert_array_equal(got.poses, want.poses)


def test_one_answer_per_request(handler, model_dir: Path) -> None:
    requests = [{"body": _batch(n, seed=n)} for n in (1, 2, 5)]
    answers = handler.handle(requests, _context(model_dir))
    assert [serving.decode_output(a).values.shape[0] for a in answers] == [1, 2, 5]


def test_engine_comes_from_the_model_config(model_dir: Path) -> None:
    h = _handler_class()()
    h.initialize(_context(model_dir, {"handler": {"engine": "torch", "threads": 1}}))
    assert type(h.model.encoder).__name__ == "TorchSession"
    assert h.device == "cpu"
    torch_out = serving.decode_output(h.handle([{"body": _batch()}], _context(model_dir))[0])
    onnx_out = serving.decode_output(
        serving.handle_payload(load_model(model_dir, "onnx"), _batch())
    )
    np.testing.assert_allclose(torch_out.values, onnx_out.values, rtol=1e-4, atol=1e-5)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not an npz", "pickled"),
        (_batch()[:100], "bad model batch"),
        (_batch(projection="nope"), "no projection 'nope'"),
        (serving.encode_batch({"image": np.zeros((2, 1, 9, 9), np.float32)}, "mean"), "shape"),
        (_npz(pixels=np.zeros((1, 1, 28, 28), np.float32)), "image"),
    ],
    ids=["garbage", "truncated", "unknown-projection", "wrong-shape", "missing-array"],
)
def test_a_bad_batch_is_a_400(handler, model_dir: Path, payload: bytes, reason: str) -> None:
    with pytest.raises(PredictionException) as info:
        handler.handle([{"body": payload}], _context(model_dir))
    assert info.value.error_code == 400
    assert reason in info.value.message
    # and the handler keeps working
    assert handler.handle([{"body": _batch()}], _context(model_dir))


@pytest.mark.parametrize("row", [{"data": b"x"}, {"body": "text"}, "not a dict"])
def test_a_request_without_body_bytes_is_a_400(handler, model_dir: Path, row) -> None:
    with pytest.raises(PredictionException) as info:
        handler.handle([row], _context(model_dir))
    assert info.value.error_code == 400


@pytest.fixture(scope="module")
def molecule_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("rdkit", reason="molecule models need RDKit")
    from quotient_models.molecules.testing import write_tiny_molecule_model

    return write_tiny_molecule_model(tmp_path_factory.mktemp("mol") / "tiny-mol")


def test_a_decode_batch_is_answered_like_handle_payload(molecule_dir: Path) -> None:
    model = load_model(molecule_dir, "onnx")
    values = model.embed_smiles(["CCO", "OC1CC1", "CC(=O)N"]).values
    payload = serving.encode_decode_batch(values)
    want = serving.decode_molecules(serving.handle_payload(model, payload))
    h = _handler_class()()
    h.initialize(_context(molecule_dir))
    [answer] = h.handle([{"body": bytearray(payload)}], _context(molecule_dir))
    assert serving.decode_molecules(answer) == want
    assert want == [(d.smiles or "", d.reason or "", d.distance) for d in model.decode(values)]
    assert all(bool(s) != bool(r) for s, r, _ in want)
    # allow_inexact travels in the batch: every valid graph comes back, with its distance
    inexact = serving.encode_decode_batch(values, allow_inexact=True)
    [answer] = h.handle([{"body": bytearray(inexact)}], _context(molecule_dir))
    assert serving.decode_molecules(answer) == [
        (d.smiles or "", d.reason or "", d.distance) for d in model.decode(values, True)
    ]
    bad = serving.encode_decode_batch(np.zeros((2, values.shape[1] + 1), np.float32))
    with pytest.raises(PredictionException) as info:
        h.handle([{"body": bad}], _context(molecule_dir))
    assert info.value.error_code == 400 and "default projection" in info.value.message


def test_a_model_without_decoder_refuses_a_decode_batch(model_dir: Path) -> None:
    model = load_model(model_dir, "onnx")
    assert not model.can_decode
    with pytest.raises(NotImplementedError, match="no decoder"):
        serving.handle_payload(model, serving.encode_decode_batch(np.zeros((1, 8), np.float32)))
