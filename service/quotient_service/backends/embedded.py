"""The in-process backend: every model under ``settings.model_store`` runs in this process.

Each model has its own thread pool (``model_workers`` threads) so a slow model never blocks the
batches of another; ONNX Runtime and torch release the GIL while they compute.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from quotient_models import serving
from quotient_models.errors import require
from quotient_models.projections import ProjectionOutput
from quotient_models.runtime import (
    ORT_HINT,
    TORCH_HINT,
    EmbeddingModel,
    InputLimits,
    OnnxSession,
    gpu_visible,
    load_model,
)
from quotient_service.backends.base import Backend, served_specs
from quotient_service.config import Settings
from quotient_service.errors import NotFound, Unavailable

__all__ = ["EmbeddedBackend", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str, engine: str) -> str:
    """``auto`` → ``cuda`` when the chosen engine can use a GPU here, else ``cpu``."""
    if device != "auto":
        return device
    if engine == "torch":
        torch = require("torch", TORCH_HINT)
        return "cuda" if torch.cuda.is_available() else "cpu"
    ort = require("onnxruntime", ORT_HINT)

    # onnxruntime-gpu lists its CUDA provider even on machines without a GPU; check for a device.
    usable = gpu_visible() and "CUDAExecutionProvider" in ort.get_available_providers()
    return "cuda" if usable else "cpu"


def warmup_payload(model: EmbeddingModel) -> bytes:
    """One small batch of the model's own warm-up items (``EmbeddingModel.warmup_inputs``),
    prepared and collated as a client's would be."""
    items = [model.prepare(data, InputLimits()) for data in model.warmup_inputs()]
    return serving.encode_batch(model.collate(items), model.resolve_projection(None))


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._models: dict[str, EmbeddingModel] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._ready = False

    async def start(self) -> None:
        specs = served_specs(self.settings)
        device = resolve_device(self.settings.device, self.settings.engine)
        loop = asyncio.get_running_loop()
        # the model's threads share the cores with decoding and gRPC: no spin-waiting between
        # batches (runtime.OnnxSession.spin_wait)
        OnnxSession.spin_wait = False
        for spec in specs:
            pool = ThreadPoolExecutor(self.settings.model_workers, thread_name_prefix=spec.name)
            self._pools[spec.name] = pool
            load = functools.partial(load_model, spec.directory, self.settings.engine, device)
            model = await loop.run_in_executor(pool, load)
            self._models[spec.name] = model
            await loop.run_in_executor(pool, serving.handle_payload, model, warmup_payload(model))
            log.info(
                "loaded %s %s (%s on %s)", spec.name, spec.version, self.settings.engine, device
            )
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()

    def models(self) -> dict[str, EmbeddingModel]:
        return dict(self._models)

    def _model(self, model_name: str) -> EmbeddingModel:
        if not self._ready:
            raise Unavailable("the embedded backend is not running")
        if model_name not in self._models:
            raise NotFound(f"model {model_name!r} is not loaded", metadata={"model": model_name})
        return self._models[model_name]

    async def run(self, model_name: str, payload: bytes) -> bytes:
        model = self._model(model_name)
        return await asyncio.get_running_loop().run_in_executor(
            self._pools[model_name], serving.handle_payload, model, payload
        )

    async def embed(
        self, model_name: str, arrays: dict[str, np.ndarray], projection: str
    ) -> ProjectionOutput:
        """``serving.embed_arrays`` in the model's pool: what ``run`` answers, without writing
        and reading the arrays as ``.npz``."""
        model = self._model(model_name)
        return await asyncio.get_running_loop().run_in_executor(
            self._pools[model_name], serving.embed_arrays, model, arrays, projection
        )

    runs_locally = True

    async def embed_alone(
        self, model_name: str, prepare: Callable[[], np.ndarray], projection: str
    ) -> ProjectionOutput:
        model = self._model(model_name)

        def work() -> ProjectionOutput:
            return serving.embed_arrays(model, model.collate([prepare()]), projection)

        return await asyncio.get_running_loop().run_in_executor(self._pools[model_name], work)

    async def ready(self) -> bool:
        return self._ready
