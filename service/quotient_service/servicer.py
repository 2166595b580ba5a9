"""quotient.v1.EmbeddingService: protobuf → domain → engine → protobuf, nothing else.

Errors are not handled here: ``errors.ErrorInterceptor`` turns them into rich statuses, and
EmbedStream uses ``errors.settle`` to put them into its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_models.molecules.featurize import is_molblock_text
from quotient_models.notes import InputNote
from quotient_models.runtime import EmbeddingModel, PrepareOptions
from quotient_service import errors
from quotient_service.admission import Admission
from quotient_service.config import Settings
from quotient_service.engine import EmbedResult, Engine, Item
from quotient_service.metrics import Metrics

__all__ = ["SERVICE_NAME", "EmbeddingServicer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_MODALITIES = {"image": pb.MODALITY_IMAGE, "molecule": pb.MODALITY_MOLECULE}
_METRICS = {
    "cosine": pb.DISTANCE_METRIC_COSINE,
    "l2": pb.DISTANCE_METRIC_L2,
    "inner_product": pb.DISTANCE_METRIC_INNER_PRODUCT,
}
_NOTE_KINDS = {
    "fragments_removed": pb.INPUT_NOTE_KIND_FRAGMENTS_REMOVED,
    "charges_neutralized": pb.INPUT_NOTE_KIND_CHARGES_NEUTRALIZED,
    "isotopes_removed": pb.INPUT_NOTE_KIND_ISOTOPES_REMOVED,
    "stereo_ignored": pb.INPUT_NOTE_KIND_STEREO_IGNORED,
}
A = TypeVar("A")
R = TypeVar("R")


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """The five RPCs; each decodes its request, calls the engine and encodes the answer."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.admission = Admission(
            settings.max_inflight_bytes, settings.max_inflight_items, metrics
        )

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        with self.admission.admit("Embed", request.ByteSize(), len(request.inputs)):
            result = await self.engine.embed(
                request.model,
                _items(request),
                request.projection,
                context.time_remaining(),
                request.model_version,
                PrepareOptions(standardize=request.standardization != pb.STANDARDIZATION_NONE),
            )
        return _embed_response(result, request.request_id)

    async def EmbedStream(
        self, requests: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        answer = functools.partial(self._answer, context=context)
        async for response in _ordered(requests, answer, self.settings.stream_concurrency):
            yield response

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models, token = self.engine.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[self._model(m) for m in models], next_page_token=token)

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.Model:
        return self._model(self.engine.model(request.name))

    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeResponse:
        with self.admission.admit("Decode", request.ByteSize(), len(request.embeddings)):
            rows = [np.asarray(e.values, dtype=np.float32) for e in request.embeddings]
            decoded = await self.engine.decode(
                request.model,
                rows,
                context.time_remaining(),
                request.model_version,
                request.allow_inexact,
            )
        return pb.DecodeResponse(
            molecules=[pb.DecodedMolecule(smiles=s, reason=r, distance=d) for s, r, d in decoded],
            model=request.model,
            request_id=request.request_id,
            model_version=self.engine.model(request.model).spec.version,
        )

    async def _answer(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedStreamResponse:
        start = time.perf_counter()
        response, status = await errors.settle(self.Embed(request, context))
        code = errors.grpc_code(status)
        self.metrics.observe_call("EmbedStream", request.model, code, time.perf_counter() - start)
        if status is not None:
            return pb.EmbedStreamResponse(request_id=request.request_id, error=status)
        return pb.EmbedStreamResponse(request_id=request.request_id, response=response)

    def _model(self, model: EmbeddingModel) -> pb.Model:
        spec, limits = model.spec, self.engine.limits
        inputs = spec.raw.get("input", {})
        domain = spec.raw.get("domain", {})  # molecule models: what an input may hold
        return pb.Model(
            name=spec.name,
            version=spec.version,
            description=spec.description,
            modality=_MODALITIES.get(spec.modality, pb.MODALITY_UNSPECIFIED),
            group=pb.SymmetryGroup(
                name=str(spec.group.get("name", "")),
                description=str(spec.group.get("description", "")),
                order=int(spec.group.get("order", 0)),
            ),
            projections=[
                pb.Projection(
                    name=p.name,
                    dimension=p.dimension,
                    invariant=p.invariant,
                    description=p.description,
                    returns_pose=p.returns_pose,
                    metric=_METRICS[p.metric],
                    normalized=p.normalized,
                )
                for p in model.projections()
            ],
            default_projection=model.resolve_projection(None),
            input_limits=pb.InputLimits(
                max_inputs_per_request=self.settings.max_inputs_per_request,
                max_input_bytes=limits.max_input_bytes,
                max_pixels=limits.max_pixels,
                image_formats=list(model.input_formats),
                model_input_size=spec.input_size,
                max_atoms=int(inputs.get("max_atoms", 0)),
                elements=list(
                    inputs.get("elements", spec.raw.get("domain", {}).get("elements", []))
                ),
                standardization=[
                    pb.StandardizationStep(name=name, description=description)
                    for name, description in model.standardization()
                ],
                formal_charges=[int(c) for c in domain.get("charges", [])],
                max_hydrogens=int(domain.get("max_hydrogens", 0)),
            ),
            metrics=[
                pb.Metric(
                    name=str(m.get("name", "")),
                    value=float(m.get("value", 0.0)),
                    description=str(m.get("description", "")),
                    command=str(m.get("command", "")),
                )
                for m in spec.metrics
                # figures only: an evaluation's full result (nested, for the card) has no value
                if isinstance(m.get("value"), int | float)
            ],
            model_card=spec.model_card(),
        )


def _items(request: pb.EmbedRequest) -> list[Item]:
    items: list[Item] = []
    for i, item in enumerate(request.inputs):
        kind = item.WhichOneof("kind")
        if kind == "molecule":
            items.append((kind, _molecule_text(item.molecule, i)))
        else:
            items.append((kind, item.image.data if kind == "image" else b""))
    return items


def _molecule_text(molecule: pb.Molecule, index: int) -> bytes:
    """The model contract takes bytes: a molecule travels as UTF-8 text, and the model tells a
    MolBlock from a SMILES by ``is_molblock_text``; so each field's text must already be of its
    field's kind by that rule, or it is refused here."""
    fmt = molecule.WhichOneof("format")
    field = f"inputs[{index}].molecule.{fmt or 'smiles'}"
    if fmt == "molblock":
        if not is_molblock_text(molecule.molblock):
            raise errors.InvalidArgument(
                "a MolBlock has several lines (header, counts, atoms, bonds, M  END); "
                "send a SMILES in molecule.smiles",
                index=index,
                field=field,
            )
        return molecule.molblock.encode("utf-8")
    if is_molblock_text(molecule.smiles):
        raise errors.InvalidArgument(
            "SMILES has a line break; send MolBlock or SDF text in molecule.molblock",
            index=index,
            field=field,
        )
    return molecule.smiles.encode("utf-8")


def _duration(seconds: float) -> Duration:
    return Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _note(note: InputNote) -> pb.InputNote:
    return pb.InputNote(
        kind=_NOTE_KINDS.get(note.kind, pb.INPUT_NOTE_KIND_UNSPECIFIED),
        message=note.message,
        removed_fragments=list(note.fragments),
        atoms=[
            pb.AtomChange(
                atom_index=a.index,
                element=a.element,
                old_charge=a.old_charge,
                new_charge=a.new_charge,
                isotope=a.isotope,
            )
            for a in note.atoms
        ],
        chiral_centers=note.chiral_centers,
        stereo_bonds=note.stereo_bonds,
    )


def _embed_response(result: EmbedResult, request_id: str) -> pb.EmbedResponse:
    poses, notes = result.poses, result.notes
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(
                values=row.tolist(),
                pose=None if poses is None else pb.Pose(rotation_degrees=float(poses[i])),
                notes=[_note(n) for n in notes[i]] if notes else [],
            )
            for i, row in enumerate(result.values)
        ],
        model=result.model,
        model_version=result.model_version,
        projection=result.projection,
        invariant=result.invariant,
        request_id=request_id,
        metadata=pb.ResponseMetadata(
            queue_time=_duration(result.queue_seconds),
            inference_time=_duration(result.inference_seconds),
            total_time=_duration(result.total_seconds),
            batch_size=result.batch_size,
        ),
    )


async def _ordered(
    source: AsyncIterator[A], fn: Callable[[A], Awaitable[R]], limit: int
) -> AsyncIterator[R]:
    """``fn`` over ``source`` with at most ``limit`` calls pending, results in source order.
    Reading stops while the window is full (backpressure on the client's stream)."""
    window: asyncio.Queue[asyncio.Task[R] | None] = asyncio.Queue(maxsize=limit)

    async def feed() -> None:
        try:
            async for item in source:
                await window.put(asyncio.ensure_future(fn(item)))
        finally:
            await window.put(None)

    feeder = asyncio.create_task(feed())
    try:
        while (task := await window.get()) is not None:
            yield await task
        await feeder  # re-raises a failure to read the stream
    finally:
        feeder.cancel()
        while not window.empty():
            pending = window.get_nowait()
            if pending is not None:
                pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
