"""The contract between the service and whatever runs model batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from quotient_models import serving
from quotient_models.projections import ProjectionOutput
from quotient_models.runtime import EmbeddingModel
from quotient_models.spec import ModelSpec, discover_models
from quotient_service.config import Settings, resolve_repo_path
from quotient_service.errors import StartupError

__all__ = ["Backend", "served_specs"]


def served_specs(settings: Settings) -> list[ModelSpec]:
    """The models under ``--model-store`` (only those ``--models`` names, in its order, when
    set); none is a start-up error (a server with nothing to serve must not report SERVING)."""
    root = resolve_repo_path(settings.model_store)
    if not root.is_dir():
        raise StartupError(
            f"--model-store / QUOTIENT_MODEL_STORE: {root} is not a directory "
            f"(given {settings.model_store!r})"
        )
    try:
        specs = discover_models(root)
    except (OSError, ValueError) as exc:
        raise StartupError(f"--model-store / QUOTIENT_MODEL_STORE: {root}: {exc}") from None
    if not specs:
        raise StartupError(
            f"--model-store / QUOTIENT_MODEL_STORE: no models under {root} "
            "(each model is a directory holding a model.json)"
        )
    wanted = [name.strip() for name in settings.models.split(",") if name.strip()]
    if not wanted:
        return specs
    found = {spec.name: spec for spec in specs}
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise StartupError(
            f"--models / QUOTIENT_MODELS: {', '.join(map(repr, unknown))} not under {root} "
            f"(it holds {', '.join(sorted(found))})"
        )
    return [found[name] for name in dict.fromkeys(wanted)]


class Backend(ABC):
    """Runs model batches for the service.

    Lifecycle:
    1. ``__init__(settings)``: cheap, no I/O, no model loading;
    2. ``await start()``: load every model, start workers, run one warm-up batch per model; when it
       returns, ``models()`` is complete and ``ready()`` is True (health turns SERVING);
    3. ``models()``: the loaded ``EmbeddingModel`` objects by name; the service uses them to
       ``prepare``/``collate`` items and to describe models (a remote backend loads them with
       ``load_model(dir, engine=None)``: no encoder, only the input side);
    4. ``await run(model_name, payload)``: one batch, concurrently with others. ``payload`` and the
       answer are ``quotient_models.serving`` bytes (``encode_batch`` → ``handle_payload``);
       raise ``errors.Unavailable`` when the backend cannot answer. ``await embed(model_name,
       arrays, projection)`` is the embedding batch the batcher sends: by default ``run`` on its
       bytes; a backend in this process computes it without serialising, and one that
       ``runs_locally`` also prepares and embeds one item in one hand-off (``embed_alone``);
    5. ``await ready()``: whether batches can run now (health checks);
    6. ``await stop()``: release everything; idempotent, safe after a failed ``start``.
    """

    name: str = "backend"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def models(self) -> dict[str, EmbeddingModel]: ...

    @abstractmethod
    async def run(self, model_name: str, payload: bytes) -> bytes: ...

    async def embed(
        self, model_name: str, arrays: dict[str, np.ndarray], projection: str
    ) -> ProjectionOutput:
        """One embedding batch of collated ``arrays``: ``run`` on its serving bytes."""
        answer = await self.run(model_name, serving.encode_batch(arrays, projection))
        return serving.decode_output(answer)

    runs_locally = False  # embed_alone works: the models run in this process

    async def embed_alone(
        self, model_name: str, prepare: Callable[[], np.ndarray], projection: str
    ) -> ProjectionOutput:
        """One item, prepared by ``prepare()`` and embedded, both where ``model_name``'s
        batches run (one hand-off instead of one to decode and one to embed), for a backend
        that ``runs_locally``; ``prepare``'s ``InputError`` is raised as it is."""
        raise NotImplementedError(f"the {self.name} backend does not run models here")

    @abstractmethod
    async def ready(self) -> bool: ...
