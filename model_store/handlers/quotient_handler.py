"""TorchServe handler: a thin adapter from TorchServe 0.12's ``BaseHandler`` to ``quotient_models``.

Every request carries one model batch, already validated and collated by the Quotient service, as
the ``body`` input (an ``.npz``, see ``quotient_models.serving``); the answer is the batch's
embeddings as bytes. All model logic lives in ``quotient_models`` and runs without TorchServe.

The archive's model-config YAML may hold ``handler: {engine: onnx|torch, threads: N}``.
A bad payload raises ``PredictionException(reason, 400)``, which TorchServe sends over gRPC as
``INVALID_ARGUMENT``; any other exception becomes TorchServe's 503 ``UNAVAILABLE`` (507 for memory).
"""

from __future__ import annotations

import zipfile

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from quotient_models.runtime import load_model
from quotient_models.serving import handle_payload

# What a malformed payload raises inside handle_payload: numpy's loader (ValueError, BadZipFile,
# EOFError), a missing array or an unknown projection (KeyError), a bad shape (InputError).
_BAD_PAYLOAD = (ValueError, KeyError, zipfile.BadZipFile, EOFError)


class QuotientHandler(BaseHandler):
    """Lifecycle: 1. ``initialize`` loads the model directory unpacked from the archive;
    2. ``preprocess`` takes each request's ``body`` bytes; 3. ``inference`` runs
    ``handle_payload`` per request; 4. ``postprocess`` returns one ``bytes`` per request."""

    def initialize(self, context) -> None:  # type: ignore[no-untyped-def]
        props = context.system_properties
        options = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        gpu_id = props.get("gpu_id")
        cuda = gpu_id is not None and torch.cuda.is_available()
        self.device = f"cuda:{gpu_id}" if cuda else "cpu"
        self.model = load_model(
            props["model_dir"],
            engine=str(options.get("engine", "onnx")),
            device=self.device,
            threads=int(options.get("threads", 0)),
        )
        self.initialized = True

    def preprocess(self, data: list[dict]) -> list[bytes]:
        bodies = []
        for row in data:
            body = row.get("body") if isinstance(row, dict) else None
            if not isinstance(body, bytes | bytearray | memoryview):
                raise PredictionException("expected one 'body' input holding a model batch", 400)
            bodies.append(bytes(body))  # the worker hands over a bytearray
        return bodies

    def inference(self, data: list[bytes], *args, **kwargs) -> list[bytes]:  # type: ignore[no-untyped-def]
        try:
            return [handle_payload(self.model, body) for body in data]
        except _BAD_PAYLOAD as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise PredictionException(f"bad model batch: {reason}", 400) from exc

    def postprocess(self, data: list[bytes]) -> list[bytes]:
        return list(data)
