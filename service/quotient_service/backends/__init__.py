"""Backends run model batches: in-process (``embedded``) or in TorchServe (``torchserve``)."""

from __future__ import annotations

from quotient_service.backends.base import Backend
from quotient_service.config import Settings

__all__ = ["Backend", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend``; the TorchServe one is imported only when asked
    for, so the embedded service needs neither TorchServe nor Java."""
    if settings.backend == "embedded":
        from quotient_service.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    if settings.backend == "torchserve":
        try:
            from quotient_service.backends.torchserve import TorchServeBackend
        except ModuleNotFoundError as exc:
            if exc.name != "quotient_service.backends.torchserve":
                raise
            raise RuntimeError(
                "backend 'torchserve' is not available in this build "
                "(quotient_service/backends/torchserve.py is missing); use --backend embedded"
            ) from exc
        return TorchServeBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
