"""The contract between the service and whatever runs model batches."""

from __future__ import annotations

from abc import ABC, abstractmethod

from quotient_models.runtime import EmbeddingModel
from quotient_service.config import Settings

__all__ = ["Backend"]


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
       raise ``errors.Unavailable`` when the backend cannot answer;
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

    @abstractmethod
    async def ready(self) -> bool: ...
