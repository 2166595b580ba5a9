"""rotmnist_c8_v1 on a tiny random instance: exact 90-degree equivariance, export, ONNX-ready.

A 90-degree CCW rotation of the input must roll every field by 2 * rotation_shift (N/4 steps) to
float32 noise; the exported plain-PyTorch module must match the escnn one. Runs in seconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("escnn", reason="escnn is a training dependency (make install-train)")

from quotient_models.images.arch_rotmnist_c8_v1 import ORDER, RotMNISTAutoencoder
from quotient_models.images.export import measure_rotation_shift
from quotient_models.images.transforms import rotate

FIELDS = 3


@pytest.fixture(scope="module")
def model() -> RotMNISTAutoencoder:
    warnings.filterwarnings("ignore", module="escnn")
    torch.manual_seed(0)
    m = RotMNISTAutoencoder(fields=FIELDS, widths=(2, 2, 2))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m.train()
        m(torch.rand(16, 1, 28, 28))
    return m.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _fields(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(len(z), FIELDS, ORDER)


def test_latent_shape_is_field_major(model: RotMNISTAutoencoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        z, logits = model(x)
    assert z.shape == (4, FIELDS * ORDER)
    assert logits.shape == x.shape


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_rolls_every_field(model: RotMNISTAutoencoder, x: torch.Tensor, k: int) -> None:
    shift, err = measure_rotation_shift(model.latent, x, FIELDS)
    assert shift in (1, -1) and err < 1e-5
    with torch.no_grad():
        z = _fields(model.latent(x))
        zr = _fields(model.latent(torch.rot90(x, k, dims=(-2, -1))))
    expected = torch.roll(z, k * 2 * shift, dims=-1)
    assert float((zr - expected).abs().max()) <= 1e-5 * float(z.abs().max())
    wrong = torch.roll(z, -k * 2 * shift, dims=-1) if k != 2 else z
    assert float((zr - wrong).abs().max()) > 1e-3 * float(z.abs().max())  # the check can fail


def test_continuous_rotation_is_only_approximately_equivariant(
    model: RotMNISTAutoencoder, x: torch.Tensor
) -> None:
    shift, _ = measure_rotation_shift(model.latent, x, FIELDS)
    with torch.no_grad():
        z = _fields(model.latent(x))
        z45 = _fields(model.latent(rotate(x, 45.0)))
    rel = float((z45 - torch.roll(z, shift, dims=-1)).norm() / z.norm())
    assert 1e-5 < rel < 1.0


def test_export_matches_escnn(model: RotMNISTAutoencoder, x: torch.Tensor) -> None:
    plain = model.export_encoder()
    assert not any("escnn" in type(m).__module__ for m in plain.modules())
    with torch.no_grad():
        ref, out = model.latent(x), plain(x)
        traced = torch.jit.trace(plain, x[:2])(x)
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()))
    assert torch.allclose(traced, ref, atol=1e-5 * float(ref.abs().max()))
