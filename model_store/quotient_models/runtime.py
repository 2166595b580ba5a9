"""Serving-time models: exported encoder + projection head, no escnn, no TorchServe.

Lifecycle of a served model (the contract both backends use):
1. ``load_model(model_dir, engine, device)`` reads model.json, the exported encoder (ONNX through
   onnxruntime, or TorchScript through torch) and the stored projection references;
2. ``model.prepare(input_bytes, limits)`` turns one client item into a model-ready array, raising
   ``InputError`` with a reason for a bad item (called per item, before batching);
3. ``model.collate(items)`` stacks prepared items into named arrays (the wire batch);
4. ``model.embed_batch(arrays, projection)`` runs the encoder and the projection;
5. ``model.decode(values)`` (only where ``model.can_decode``): embeddings of the default projection
   [B, D] → one ``Decoded`` per row (``check_decode_values`` validates the rows first).
``quotient_models.serving.handle_payload`` wraps 3-5 for the TorchServe handler and the embedded
backend alike.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from quotient_models.errors import DeviceUnavailable, InputError, require
from quotient_models.images.preprocess import (
    FORMATS,
    Framing,
    decode_image,
    header_pixels,
    model_input,
)
from quotient_models.projections import CyclicProjectionHead, ProjectionInfo, ProjectionOutput
from quotient_models.spec import ModelSpec

__all__ = [
    "ENGINES",
    "Decoded",
    "EmbeddingModel",
    "ImageModel",
    "InputLimits",
    "check_decode_values",
    "load_model",
]

ENGINES = ("onnx", "torch")
ORT_HINT = (
    "make install (CPU) or make install-gpu; pip install 'quotient-server[cpu]' or "
    "'quotient-server[gpu]'"
)
TORCH_HINT = "--engine torch needs it: make install-torch, or pip install 'quotient-server[torch]'"


@dataclass(frozen=True)
class InputLimits:
    """Per-item limits the service enforces (set by its configuration)."""

    max_input_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = FORMATS


class Encoder(Protocol):
    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]: ...


class OnnxSession:
    """An exported network through ONNX Runtime: CUDA when asked for and available, else the CPU.
    Called with the network's inputs in order; returns its outputs in order."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        ort = require("onnxruntime", ORT_HINT)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        cuda = device.startswith("cuda")
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceUnavailable(
                    f"device {device!r}: this ONNX Runtime ({ort.__version__}, package "
                    "onnxruntime) has no CUDA provider; install onnxruntime-gpu (the gpu extra, "
                    "or the gpu image), or use --device cpu"
                )
            # CUDA and cuDNN from the nvidia-* wheels (the gpu image) are not on the loader's
            # path: onnxruntime-gpu loads them from site-packages when asked to.
            preload = getattr(ort, "preload_dlls", None)
            if callable(preload):
                preload()
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()
        if cuda and "CUDAExecutionProvider" not in self.providers:
            # onnxruntime-gpu falls back to the CPU silently when it cannot start CUDA
            raise DeviceUnavailable(
                f"device {device!r}: ONNX Runtime could not start its CUDA provider ({_no_gpu()}); "
                "its own log line above says which library failed to load; use --device cpu or "
                "--device auto"
            )

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(x) for n, x in zip(self.names, inputs, strict=True)}
        return self.session.run(None, feed)


def gpu_visible() -> bool:
    """Whether an NVIDIA device node is visible to this process (a container gets it only when
    the runtime passes the GPU in)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def _no_gpu() -> str:
    if not gpu_visible():
        return "no NVIDIA device is visible: /dev/nvidiactl is absent"
    return "an NVIDIA device is visible, so a driver, CUDA or cuDNN library is missing"


class TorchSession:
    """A TorchScript module (e.g. saved from escnn's ``.export()``); runs without escnn or PyG.
    Same calling convention as ``OnnxSession``."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        torch = require("torch", TORCH_HINT)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if device.startswith("cuda") and not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceUnavailable(
                f"device {device!r}: torch {torch.__version__} ({build}) sees no CUDA device "
                f"({_no_gpu()}); use --device cpu or --device auto"
            )
        self.device = torch.device(device if device.startswith("cuda") else "cpu")
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.providers = [str(self.device)]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        with self.torch.inference_mode():
            tensors = [
                self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in inputs
            ]
            out = self.module(*tensors)
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.float().cpu().numpy() for o in outs]


class Decoded(Protocol):
    """What one embedding decodes to: canonical SMILES, or the reason there is no molecule."""

    @property
    def smiles(self) -> str | None: ...

    @property
    def reason(self) -> str | None: ...


class EmbeddingModel(ABC):
    """A served model: spec, encoder, projections."""

    spec: ModelSpec

    @abstractmethod
    def projections(self) -> list[ProjectionInfo]: ...

    @abstractmethod
    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray: ...

    @abstractmethod
    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def embed_batch(
        self, arrays: dict[str, np.ndarray], projection: str | None = None
    ) -> ProjectionOutput: ...

    @property
    def can_decode(self) -> bool:
        """Whether ``decode`` turns embeddings back into inputs (False: no decoder)."""
        return False

    def decode(self, values: np.ndarray) -> Sequence[Decoded]:
        """Embeddings [B, D] of the default projection → one ``Decoded`` per row."""
        raise NotImplementedError(f"model {self.spec.name!r} has no decoder")

    def decode_input_error(self, values: np.ndarray) -> str | None:
        """Why one embedding [D] of the right length cannot be decoded, or None."""
        return None

    def item_cost(self, item: np.ndarray) -> int:
        """Cost of one prepared item for the batcher's budget (pixels, atoms, ...)."""
        return int(item.size)

    def input_pixels(self, data: bytes) -> int:
        """Pixels that preparing ``data`` would decode, read cheaply before decoding (from an
        image's header); 0 for inputs that are not images or whose header is unreadable (the
        decode itself then refuses them)."""
        return 0

    def resolve_projection(self, name: str | None) -> str:
        chosen = name or self.spec.default_projection
        known = [p.name for p in self.projections()]
        if chosen not in known:
            raise KeyError(
                f"model {self.spec.name!r} has no projection {chosen!r}; known: {', '.join(known)}"
            )
        return chosen


class ImageModel(EmbeddingModel):
    """A C_N-equivariant image encoder with its cyclic projection head."""

    def __init__(self, spec: ModelSpec, encoder: Encoder, head: CyclicProjectionHead) -> None:
        self.spec, self.encoder, self.head = spec, encoder, head
        self.size = spec.input_size
        # how content is centred and scaled in the frame (model.json "input.frame"; None: fitted)
        self.framing = Framing.from_spec(spec.raw.get("input", {}).get("frame"))

    def projections(self) -> list[ProjectionInfo]:
        return self.head.describe()

    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray:
        pixels = decode_image(
            data,
            self.size,
            max_input_bytes=limits.max_input_bytes,
            max_pixels=limits.max_pixels,
            framing=self.framing,
        )
        return pixels[None]  # [1, S, S]

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


def check_decode_values(
    model: EmbeddingModel, rows: Sequence[np.ndarray] | np.ndarray
) -> np.ndarray:
    """Embeddings to decode → float32 [B, D]; raises ``InputError`` naming the first row whose
    length is not the dimension of the model's default projection, or whose values the model
    could not have produced (``EmbeddingModel.decode_input_error``)."""
    default = model.resolve_projection(None)
    dimension = next(p.dimension for p in model.projections() if p.name == default)
    for i, row in enumerate(rows):
        size = int(np.asarray(row).size)
        if np.ndim(row) != 1 or size != dimension:
            raise InputError(
                f"embedding has {size} values; model {model.spec.name!r} decodes its default "
                f"projection {default!r}, which has {dimension}",
                index=i,
            )
        reason = model.decode_input_error(np.asarray(row))
        if reason is not None:
            raise InputError(f"not a {default!r} embedding of {model.spec.name!r}: {reason}", i)
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), dimension)


class _NoEncoder:
    """The encoder where only preparation runs (the service in front of TorchServe)."""

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("this model was loaded without an encoder (engine=None)")


def load_model(
    model_dir: str | Path, engine: str | None = "onnx", device: str = "cpu", threads: int = 0
) -> EmbeddingModel:
    """Load a model directory for serving. ``engine`` is "onnx", "torch", or None for a model that
    only prepares and collates inputs (its batches run elsewhere, e.g. in TorchServe)."""
    spec = ModelSpec.load(model_dir)
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if (
        spec.modality == "molecule"
    ):  # imported here: RDKit is only needed where molecules are served
        from quotient_models.molecules.model import load_molecule_model

        return load_molecule_model(model_dir, engine, device, threads)
    if spec.modality != "image":
        raise ValueError(f"{spec.name}: modality {spec.modality!r} is not served by this version")
    encoder: Encoder
    if engine is None:
        encoder = _NoEncoder()
    elif engine == "onnx":
        encoder = OnnxSession(spec.path("encoder", "onnx"), device=device, threads=threads)
    else:
        encoder = TorchSession(spec.path("encoder", "torchscript"), device=device, threads=threads)
    head = CyclicProjectionHead.load(spec.path("projection_head", "file"))
    return ImageModel(spec, encoder, head)
