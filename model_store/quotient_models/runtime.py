"""Serving-time models: the contract every model family follows, no escnn, no TorchServe.

Lifecycle of a served model (the contract both backends use):
1. ``load_model(model_dir, engine, device)`` reads model.json and calls its family's loader: the
   module named by model.json's ``"family"`` (e.g. ``"family": "my_package.model"``), else by
   convention ``quotient_models.<modality>s.model`` (``images.model``, ``molecules.model``). The
   module exposes ``load(model_dir, engine, device, threads) -> EmbeddingModel``, which reads the
   exported networks (ONNX through onnxruntime: ``OnnxSession``, or TorchScript through torch:
   ``TorchSession``) and the stored projection references. No table here lists the families, so
   adding one needs no edit to this module;
2. ``model.prepare(input_bytes, limits)`` turns one client item into a model-ready array, raising
   ``InputError`` with a reason for a bad item (called per item, before batching); the service
   calls it through ``model.prepare_noted(input_bytes, limits, options)``, which also returns
   what preparing changed in the item (``InputNote``s: a molecule's standardisation, its ignored
   stereochemistry) and applies the request's ``PrepareOptions``;
3. ``model.collate(items)`` stacks prepared items into named arrays (the wire batch);
4. ``model.embed_batch(arrays, projection)`` runs the encoder and the projection;
5. ``model.decode(values)`` (only where ``model.can_decode``): embeddings of the default projection
   [B, D] → one ``Decoded`` per row (``check_decode_values`` validates the rows first).
``quotient_models.serving.handle_payload`` wraps 3-5 for the TorchServe handler and the embedded
backend alike; ``model.warmup_inputs()`` gives the client items of the backends' warm-up batch.
"""

from __future__ import annotations

import importlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from quotient_models.errors import DeviceUnavailable, InputError, require
from quotient_models.notes import InputNote
from quotient_models.projections import ProjectionInfo, ProjectionOutput
from quotient_models.spec import ModelSpec

__all__ = [
    "ENGINES",
    "Decoded",
    "EmbeddingModel",
    "Encoder",
    "InputLimits",
    "OnnxSession",
    "PrepareOptions",
    "TorchSession",
    "check_decode_values",
    "family_module",
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


@dataclass(frozen=True)
class PrepareOptions:
    """What a request asks of preparation (``EmbedRequest`` fields): ``standardize`` False turns
    the model's standardisation off for the request's items (molecules embedded as sent)."""

    standardize: bool = True


class Encoder(Protocol):
    """An exported network: its inputs in order → its outputs in order."""

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]: ...


class OnnxSession:
    """An exported network through ONNX Runtime: CUDA when asked for and available, else the CPU.
    Called with the network's inputs in order; returns its outputs in order.

    ``spin_wait``: whether ONNX Runtime's intra-op threads spin after each parallel section to
    catch the next one sooner (its default, and the fastest for a program that only runs the
    model). A server does other work on the same cores (decoding inputs, answering calls), and
    spinning threads take those cores from it: the embedded backend turns it off for the
    sessions it loads (measured by ``make bench-serving``; CHANGELOG)."""

    spin_wait: ClassVar[bool] = True

    def __init__(
        self, path: Path, device: str = "cpu", threads: int = 0, dynamic_shapes: bool = False
    ) -> None:
        ort = require("onnxruntime", ORT_HINT)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not self.spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if dynamic_shapes:
            # ONNX Runtime's CPU arena keeps the largest block each shape asked for; with inputs
            # whose sizes vary from call to call (atoms per batch) it grew past 10 GB while a
            # drug-like evaluation decoded 2,000 molecules; without it memory follows the batch
            options.enable_cpu_mem_arena = False
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
    """What one embedding decodes to: canonical SMILES, or the reason there is no molecule;
    ``distance``: how far the decoded molecule embeds from the embedding (None: not measured)."""

    @property
    def smiles(self) -> str | None: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def distance(self) -> float | None: ...


class EmbeddingModel(ABC):
    """A served model: spec, encoder, projections (the lifecycle is the module's docstring)."""

    spec: ModelSpec
    # input file formats ``prepare`` decodes (PIL names, GetModel's ``image_formats``); () where
    # the inputs are not files of a format (SMILES)
    input_formats: tuple[str, ...] = ()

    @abstractmethod
    def projections(self) -> list[ProjectionInfo]: ...

    @abstractmethod
    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray: ...

    def prepare_noted(
        self, data: bytes, limits: InputLimits, options: PrepareOptions | None = None
    ) -> tuple[np.ndarray, tuple[InputNote, ...]]:
        """``prepare`` under the request's ``options``, with what preparing changed in the item
        or ignored of it (``quotient_models.notes``), in order; this default changes nothing and
        returns no notes. The service calls this one."""
        return self.prepare(data, limits), ()

    def standardization(self) -> list[tuple[str, str]]:
        """The steps of the model's input standardisation as (name, what it does), in the
        order they run (GetModel); none by default."""
        return []

    @abstractmethod
    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def warmup_inputs(self) -> list[bytes]:
        """Client items (as ``prepare`` takes them, valid and small) for the warm-up batch a
        backend runs before it serves (compiles kernels, allocates arenas)."""

    @abstractmethod
    def embed_batch(
        self, arrays: dict[str, np.ndarray], projection: str | None = None
    ) -> ProjectionOutput: ...

    @property
    def can_decode(self) -> bool:
        """Whether ``decode`` turns embeddings back into inputs (False: no decoder)."""
        return False

    def decode(self, values: np.ndarray, allow_inexact: bool = False) -> Sequence[Decoded]:
        """Embeddings [B, D] of the default projection → one ``Decoded`` per row; a decode that
        does not embed back to its row is refused unless ``allow_inexact``."""
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

    def _described(self, head: Any) -> list[ProjectionInfo]:
        """``head.describe()``, kept while the model holds that head (it is asked for on every
        call: which projections exist, the chosen one's info)."""
        cached = getattr(self, "_description", None)
        if cached is None or cached[0] is not head:
            cached = (head, tuple(head.describe()))
            self._description = cached
        return list(cached[1])

    def resolve_projection(self, name: str | None) -> str:
        chosen = name or self.spec.default_projection
        known = [p.name for p in self.projections()]
        if chosen not in known:
            raise KeyError(
                f"model {self.spec.name!r} has no projection {chosen!r}; known: {', '.join(known)}"
            )
        return chosen


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


FAMILY_KEY = "family"
_MODALITY = re.compile(r"^[a-z][a-z0-9_]*$")


def family_module(spec: ModelSpec) -> str:
    """The module whose ``load`` serves this model: model.json's ``"family"``, else
    ``quotient_models.<modality>s.model``."""
    named = spec.raw.get(FAMILY_KEY)
    if named is not None:
        if not isinstance(named, str) or not named:
            raise ValueError(
                f"model {spec.name!r}: model.json {FAMILY_KEY!r} must name a module "
                f"(e.g. 'my_package.model'), got {named!r}"
            )
        return named
    if not _MODALITY.match(spec.modality):
        raise ValueError(
            f"model {spec.name!r}: modality {spec.modality!r} names no module (lower-case letters, "
            f"digits and '_'); name the family's module in model.json {FAMILY_KEY!r}"
        )
    return f"quotient_models.{spec.modality}s.model"


def _family_loader(spec: ModelSpec) -> Callable[..., EmbeddingModel]:
    name = family_module(spec)
    named = FAMILY_KEY in spec.raw
    how = "named in model.json" if named else f"by convention for modality {spec.modality!r}"
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # missing, or raising on import: either way not servable
        hint = "" if named else f"; another family's module is named in model.json {FAMILY_KEY!r}"
        raise ValueError(
            f"model {spec.name!r}: its family module {name!r} ({how}) cannot be imported: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    loader = getattr(module, "load", None)
    if not callable(loader):
        raise ValueError(
            f"model {spec.name!r}: its family module {name!r} ({how}) has no "
            "load(model_dir, engine, device, threads) function"
        )
    return loader


def load_model(
    model_dir: str | Path, engine: str | None = "onnx", device: str = "cpu", threads: int = 0
) -> EmbeddingModel:
    """Load a model directory for serving through its family's ``load`` (``family_module``).
    ``engine`` is "onnx", "torch", or None for a model that only prepares and collates inputs
    (its batches run elsewhere, e.g. in TorchServe)."""
    spec = ModelSpec.load(model_dir)
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    model = _family_loader(spec)(spec.directory, engine, device, threads)
    if not isinstance(model, EmbeddingModel):
        raise ValueError(
            f"model {spec.name!r}: {family_module(spec)}.load returned a "
            f"{type(model).__name__}, not an EmbeddingModel"
        )
    return model
