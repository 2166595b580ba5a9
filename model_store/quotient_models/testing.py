"""A tiny, exactly C4-equivariant image model directory for tests of the serving stack.

It does not need escnn: a small random CNN f is applied to the four 90-degree rotations of the
input, z[:, c, k] = f(rot90(x, -k))[c], so rotating the input by 90 degrees rolls every field by
one step. Its figures mean nothing; it exists so that service, backend and client tests can run
before (and independently of) the trained models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quotient_models.projections import CyclicProjectionHead

__all__ = ["write_tiny_image_model"]


def _module(fields: int, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TinyC4(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(1, 8, 5, padding=2),
                nn.ReLU(),
                nn.AvgPool2d(4),
                nn.Flatten(),
                nn.LazyLinear(fields),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            views, view = [], x
            for _ in range(4):  # rot90(x, -k), written with flip/transpose so that ONNX exports it
                views.append(view)
                view = view.transpose(2, 3).flip(3)
            rots = [self.f(v) for v in views]
            return torch.stack(rots, dim=-1).reshape(x.shape[0], -1)  # [B, fields*4], field-major

    module = TinyC4()
    module(torch.zeros(1, 1, 28, 28))  # materialise the lazy layer
    return module.eval()


def write_tiny_image_model(
    directory: str | Path, name: str = "tiny-c4", fields: int = 4, seed: int = 0
) -> Path:
    """Write a complete model directory (model.json, ONNX, TorchScript, projections)."""
    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    module = _module(fields, seed)
    example = torch.rand(2, 1, 28, 28)
    torch.jit.trace(module, example).save(str(out / "encoder.pt"))
    torch.onnx.export(
        module,
        (example,),
        str(out / "encoder.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["latent"],
        dynamic_axes={"image": {0: "batch"}, "latent": {0: "batch"}},
    )
    CyclicProjectionHead.create(fields, 4, seed=seed, rotation_shift=1).save(out / "projection.npz")
    spec = {
        "name": name,
        "version": "0.0.1",
        "description": "Tiny random C4-equivariant test model (figures meaningless).",
        "modality": "image",
        "architecture": "tiny_c4_test",
        "group": {"name": "C4", "order": 4, "description": "rotations by multiples of 90 degrees"},
        "input": {"size": 28, "channels": 1},
        "latent": {"fields": fields, "group_order": 4, "rotation_shift": 1},
        "projection_head": {
            "file": "projection.npz",
            "seed": seed,
            "maxfilter_templates": fields * 4,
        },
        "default_projection": "align",
        "encoder": {"onnx": "encoder.onnx", "torchscript": "encoder.pt"},
        "card": "MODEL_CARD.md",
        "metrics": "metrics.json",
    }
    (out / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(f"# {name}\n\nA tiny random model for tests. No figures.\n")
    (out / "metrics.json").write_text("[]\n")
    return out


if __name__ == "__main__":
    import sys

    path = write_tiny_image_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-c4")
    from quotient_models.runtime import load_model

    for engine in ("onnx", "torch"):
        model = load_model(path, engine=engine)
        x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
        a = model.embed(x)  # type: ignore[attr-defined]
        b = model.embed(np.rot90(x, 1, axes=(2, 3)).copy())  # type: ignore[attr-defined]
        print(engine, np.abs(a.values - b.values).max(), a.poses, b.poses)
