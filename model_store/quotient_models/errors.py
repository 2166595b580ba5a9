"""Errors raised by model code, independent of gRPC and TorchServe."""

from __future__ import annotations

__all__ = ["DeviceUnavailable", "InputError", "MissingRuntime"]


class InputError(ValueError):
    """An input item cannot be embedded; ``reason`` says why in words a client can act on.

    ``index`` is the item's position in the client's request, filled in by whoever knows it.
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason if index is None else f"input {index}: {reason}")
        self.reason = reason
        self.index = index

    def at(self, index: int) -> InputError:
        return InputError(self.reason, index)


class DeviceUnavailable(RuntimeError):
    """The device asked for (``cuda``) cannot be used here; the message says what is missing."""


class MissingRuntime(RuntimeError):
    """The package an engine needs (onnxruntime, torch) is not installed; the message says how
    to install it."""


def require(module: str, hint: str):  # type: ignore[no-untyped-def]
    """``importlib.import_module(module)``, or ``MissingRuntime`` with ``hint`` if absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise MissingRuntime(f"{module} is not installed: {hint}") from None
