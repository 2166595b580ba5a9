"""The served image model: image files in, rotation-invariant embeddings out.

Runs from a model directory with the exported C_N-equivariant encoder (ONNX or TorchScript) and
its cyclic projection head; no escnn. Follows the ``EmbeddingModel`` contract of
``quotient_models.runtime`` (the family that ``runtime.load_model`` finds by convention for
modality "image"):

1. ``load(model_dir, engine, device, threads)`` reads model.json (its ``input``: size and frame),
   the encoder and projection.npz;
2. ``prepare(bytes, limits)``: one image file → float32 [1, S, S] under the input policy of
   ``images/preprocess.py``, raising ``InputError`` with the reason;
3. ``collate(items)`` → ``image`` [B, 1, S, S];
4. ``embed_batch(arrays, projection)`` → ``ProjectionOutput`` (poses for the projections that
   return one).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from quotient_models.errors import InputError
from quotient_models.images.preprocess import (
    FORMATS,
    Framing,
    decode_image,
    header_pixels,
    model_input,
)
from quotient_models.projections import CyclicProjectionHead, ProjectionInfo, ProjectionOutput
from quotient_models.runtime import (
    ENGINES,
    EmbeddingModel,
    Encoder,
    InputLimits,
    OnnxSession,
    TorchSession,
)
from quotient_models.spec import ModelSpec

__all__ = ["ImageModel", "load"]


class ImageModel(EmbeddingModel):
    """A C_N-equivariant image encoder with its cyclic projection head."""

    input_formats = FORMATS

    def __init__(self, spec: ModelSpec, encoder: Encoder, head: CyclicProjectionHead) -> None:
        self.spec, self.encoder, self.head = spec, encoder, head
        self.size = spec.input_size
        # how content is centred and scaled in the frame (model.json "input.frame"; None: fitted)
        self.framing = Framing.from_spec(spec.raw.get("input", {}).get("frame"))

    def projections(self) -> list[ProjectionInfo]:
        return self._described(self.head)

    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray:
        pixels = decode_image(
            data,
            self.size,
            max_input_bytes=limits.max_input_bytes,
            max_pixels=limits.max_pixels,
            framing=self.framing,
        )
        return pixels[None]  # [1, S, S]

    def warmup_inputs(self) -> list[bytes]:
        """A blank S x S PNG (prepares to zeros, as no frame is found in it)."""
        buffer = io.BytesIO()
        Image.new("L", (self.size, self.size)).save(buffer, format="PNG")
        return [buffer.getvalue()]

    def frame(self, images: np.ndarray) -> np.ndarray:
        """Grayscale images [B, H, W] in [0, 1] → model inputs [B, S, S], as ``prepare`` makes
        them from decoded files (polarity, frame, size): for measuring arrays without encoding."""
        return np.stack(
            [model_input(np.asarray(g, np.float32), self.size, self.framing) for g in images]
        )

    def input_pixels(self, data: bytes) -> int:
        return header_pixels(data)

    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": np.stack(items).astype(np.float32)}

    def latent(self, x: np.ndarray) -> np.ndarray:
        """Encoder output of images [B, 1, S, S] as [B, C, N]."""
        if x.ndim != 4 or x.shape[1:] != (1, self.size, self.size):
            raise InputError(
                f"expected images of shape [B, 1, {self.size}, {self.size}], got {list(x.shape)}"
            )
        z = self.encoder(np.asarray(x, dtype=np.float32))[0]
        return z.reshape(len(x), self.head.fields, self.head.order)

    def embed(self, x: np.ndarray, projection: str | None = None) -> ProjectionOutput:
        return self.head.apply(self.resolve_projection(projection), self.latent(x))

    def embed_batch(
        self, arrays: dict[str, np.ndarray], projection: str | None = None
    ) -> ProjectionOutput:
        return self.embed(arrays["image"], projection)


class _NoEncoder:
    """The encoder where only preparation runs (the service in front of TorchServe)."""

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("this model was loaded without an encoder (engine=None)")


def load(
    model_dir: str | Path, engine: str | None = "onnx", device: str = "cpu", threads: int = 0
) -> ImageModel:
    """The image family's loader, called by ``runtime.load_model`` for modality "image"."""
    spec = ModelSpec.load(model_dir)
    if spec.modality != "image":
        raise ValueError(f"{spec.name}: modality {spec.modality!r} is not an image model")
    encoder: Encoder
    if engine is None:
        encoder = _NoEncoder()
    elif engine == "onnx":
        encoder = OnnxSession(spec.path("encoder", "onnx"), device=device, threads=threads)
    elif engine == "torch":
        encoder = TorchSession(spec.path("encoder", "torchscript"), device=device, threads=threads)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    head = CyclicProjectionHead.load(spec.path("projection_head", "file"))
    return ImageModel(spec, encoder, head)
