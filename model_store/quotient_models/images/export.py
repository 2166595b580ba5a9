"""Export a trained rotmnist_c8_v1 model for serving (no escnn needed at serving time).

``python -m quotient_models.images.export --model model_store/models/rotmnist-c8`` reads
``checkpoint.pt`` and writes, next to it:

1. ``encoder.pt``: TorchScript trace of the escnn ``.export()``-ed encoder (eval mode);
2. ``encoder.onnx``: ONNX opset 17, input ``image`` [B, 1, 28, 28], output ``latent`` [B, C*8];
3. a check that escnn, the exported module, the TorchScript file and ONNX Runtime (CPU) agree
   (fails when the relative difference exceeds 1e-4), and a measurement of ``rotation_shift``:
   the latent roll (in group steps per 45 degrees) when the input is rotated CCW by 90 degrees;
4. ``projection.npz`` (the seeded references of the projections) and ``model.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quotient_models.images.arch_rotmnist_c8_v1 import ORDER, SIZE, RotMNISTAutoencoder
from quotient_models.projections import CyclicProjectionHead

__all__ = [
    "PROJECTION_SEED",
    "export_model",
    "load_checkpoint",
    "measure_rotation_shift",
    "save_checkpoint",
]

ARCHITECTURE = "rotmnist_c8_v1"
PROJECTION_SEED = 20261123
RTOL = 1e-4


def _log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def _derived(key: str) -> bool:
    """escnn buffers recomputed from the weights (expanded filters, sampled bases): not saved."""
    return key.endswith((".filter", ".expanded_bias")) or "._basisexpansion." in key


def save_checkpoint(model: RotMNISTAutoencoder, path: str | Path) -> None:
    """Weights and BatchNorm statistics of encoder and decoder (without escnn's derived buffers)."""
    state = {k: v for k, v in model.state_dict().items() if not _derived(k)}
    torch.save(
        {
            "architecture": ARCHITECTURE,
            "fields": model.fields,
            "widths": list(model.widths),
            "state_dict": state,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> RotMNISTAutoencoder:
    """The escnn autoencoder (eval mode) from a ``checkpoint.pt`` written by train.py."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["architecture"] != ARCHITECTURE:
        raise ValueError(
            f"{path}: architecture {ckpt['architecture']!r}, expected {ARCHITECTURE!r}"
        )
    w1, w2, w3 = (int(w) for w in ckpt["widths"])
    model = RotMNISTAutoencoder(int(ckpt["fields"]), (w1, w2, w3))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected or any(not _derived(k) for k in missing):
        raise ValueError(
            f"{path}: state_dict mismatch (missing {missing}, unexpected {unexpected})"
        )
    model.train()  # escnn expands the filters from the loaded weights when switching to eval
    return model.eval()


def _rel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(a - ref).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-12)


def measure_rotation_shift(latent_fn: Any, x: torch.Tensor, fields: int) -> tuple[int, float]:
    """+1 when rotating the input CCW by 90 degrees rolls every field by +N/4, -1 for -N/4.

    Returns the sign and the relative error of the better of the two (must be float noise)."""
    with torch.no_grad():
        z = latent_fn(x).reshape(len(x), fields, ORDER)
        zr = latent_fn(torch.rot90(x, 1, dims=(-2, -1))).reshape(len(x), fields, ORDER)
    scale = float(z.abs().max())
    errors = {
        s: float((zr - torch.roll(z, s * ORDER // 4, dims=-1)).abs().max()) / scale for s in (1, -1)
    }
    sign = min(errors, key=lambda s: errors[s])
    return sign, errors[sign]


def _onnx_latent(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["latent"], {"image": x})[0]


def _model_json(fields: int, rotation_shift: int, n_templates: int, default: str) -> dict[str, Any]:
    return {
        "name": "rotmnist-c8",
        "version": "1.1.0",
        "description": (
            "C8-equivariant convolutional encoder (escnn, regular fields) for 28x28 grayscale "
            "digits, trained self-supervised (equivariant autoencoder + instance "
            "discrimination) on rotated MNIST digits; serves rotation-invariant embeddings "
            "through invariant projections of its latent."
        ),
        "modality": "image",
        "architecture": ARCHITECTURE,
        "group": {
            "name": f"C{ORDER}",
            "order": ORDER,
            "description": (
                "rotations of the image plane by multiples of 45 degrees "
                "(90-degree multiples exact on the pixel grid)"
            ),
        },
        "input": {"size": SIZE, "channels": 1},
        "latent": {"fields": fields, "group_order": ORDER, "rotation_shift": rotation_shift},
        "projection_head": {
            "file": "projection.npz",
            "seed": PROJECTION_SEED,
            "maxfilter_templates": n_templates,
        },
        "default_projection": default,
        "encoder": {"onnx": "encoder.onnx", "torchscript": "encoder.pt"},
        "card": "MODEL_CARD.md",
        "metrics": "metrics.json",
    }


def export_model(
    model: RotMNISTAutoencoder,
    model_dir: str | Path,
    x: torch.Tensor,
    n_templates: int | None = None,
) -> dict[str, Any]:
    """Write encoder.pt, encoder.onnx, projection.npz and model.json; return the checks' figures.

    ``x`` [B, 1, 28, 28] are the inputs the exports are compared on (real digits preferably).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    fields = model.fields
    with torch.no_grad():
        ref = model.latent(x).numpy()
        plain = model.export_encoder()
        exported = plain(x).numpy()
        traced = torch.jit.trace(plain, x[:2])
    traced.save(str(model_dir / "encoder.pt"))
    onnx_path = model_dir / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            plain,
            (x[:2],),
            str(onnx_path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["latent"],
            dynamic_axes={"image": {0: "batch"}, "latent": {0: "batch"}},
        )
    with torch.no_grad():
        scripted = torch.jit.load(str(model_dir / "encoder.pt"))(x).numpy()
    onnx_out = _onnx_latent(onnx_path, x.numpy().astype(np.float32))
    checks = {
        "exported_vs_escnn": _rel(exported, ref),
        "torchscript_vs_escnn": _rel(scripted, ref),
        "onnx_vs_escnn": _rel(onnx_out, ref),
    }
    for name, (abs_diff, rel_diff) in checks.items():
        _log(f"{name}: max abs diff {abs_diff:.2e}, relative {rel_diff:.2e}")
        if rel_diff > RTOL:
            raise RuntimeError(
                f"export check failed: {name} relative difference {rel_diff:.2e} > {RTOL:g}"
            )
    shift, shift_err = measure_rotation_shift(
        lambda t: torch.from_numpy(_onnx_latent(onnx_path, t.numpy())), x, fields
    )
    _log(
        f"rotation_shift {shift:+d} (90-degree rotation rolls fields by {shift * ORDER // 4:+d}; "
        f"rel. error {shift_err:.1e})"
    )
    if shift_err > RTOL:
        raise RuntimeError(
            f"90-degree equivariance broken: relative error {shift_err:.2e} > {RTOL:g}"
        )
    k = n_templates or fields * ORDER
    CyclicProjectionHead.create(
        fields=fields, order=ORDER, seed=PROJECTION_SEED, n_templates=k, rotation_shift=shift
    ).save(model_dir / "projection.npz")
    spec_path = model_dir / "model.json"
    previous = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    spec = _model_json(fields, shift, k, previous.get("default_projection", "align"))
    # set by the evaluation (the default, the frame's calibrated radius) and by releases
    spec["version"] = previous.get("version", spec["version"])
    if "frame" in previous.get("input", {}):
        spec["input"]["frame"] = previous["input"]["frame"]
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    _log(f"wrote encoder.pt, encoder.onnx, projection.npz, model.json in {model_dir}")
    return {
        "checks": {k: {"max_abs_diff": a, "max_rel_diff": r} for k, (a, r) in checks.items()},
        "rotation_shift": shift,
        "rotation_shift_rel_error": shift_err,
    }


def sample_inputs(data_dir: str | Path | None, n: int = 64) -> torch.Tensor:
    """Real test digits when the data is there, else seeded random images."""
    if data_dir is not None and (Path(data_dir) / "mnist10k.npz").exists():
        from quotient_models.images.data import load_mnist

        images = load_mnist(data_dir)["test"][0]
        idx = np.linspace(0, len(images) - 1, n).astype(int)
        return torch.from_numpy(images[idx][:, None].copy())
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quotient_models.images.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model",
        default="model_store/models/rotmnist-c8",
        help="model directory holding checkpoint.pt",
    )
    parser.add_argument(
        "--data",
        default="data/mnist",
        help="digits to compare the exports on (random images if absent)",
    )
    parser.add_argument(
        "--templates", type=int, default=None, help="max-filter templates (default C*8)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = load_checkpoint(Path(args.model) / "checkpoint.pt")
    report = export_model(model, args.model, sample_inputs(args.data), args.templates)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
