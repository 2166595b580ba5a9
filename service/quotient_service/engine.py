"""The domain layer: validate a request, prepare its items, batch them, return embeddings.

No protobuf here: items arrive as ``(kind, data)`` pairs (kind ``"image"``/``"molecule"``, or None
when the client set neither) and results leave as numpy arrays, with each item's input notes
(what preparing changed in it, ``quotient_models.notes``) in request order. Every refusal is a
``QuotientError`` naming the item's index when there is one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field

import numpy as np

from quotient_models import serving
from quotient_models.errors import InputError
from quotient_models.molecules.featurize import is_molblock_text
from quotient_models.notes import InputNote
from quotient_models.runtime import (
    EmbeddingModel,
    InputLimits,
    PrepareOptions,
    check_decode_values,
)
from quotient_service.backends.base import Backend
from quotient_service.batching import Batcher, BatchResult, loop_time
from quotient_service.config import Settings
from quotient_service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from quotient_service.prepare import NOT_STARTED, PreparePool, prepare_remote

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "EmbedResult", "Engine", "Item"]

Item = tuple[str | None, bytes]
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


def _data_field(kind: str | None, data: bytes) -> str:
    """The request field an item's data came from (for FieldViolation)."""
    if kind == "image":
        return "image.data"
    if kind == "molecule":  # the servicer admits each field's text only if the rule agrees
        text = data.decode("utf-8", errors="replace")
        return "molecule.molblock" if is_molblock_text(text) else "molecule.smiles"
    return str(kind)


@dataclass(frozen=True)
class EmbedResult:
    model: str
    model_version: str
    projection: str
    invariant: bool
    values: np.ndarray  # [B, D] float32, request order
    poses: np.ndarray | None  # [B] degrees, when the projection returns a pose
    queue_seconds: float
    inference_seconds: float
    total_seconds: float
    batch_size: int
    # per item, request order: what preparing changed in it or ignored of it (InputNote)
    notes: tuple[tuple[InputNote, ...], ...] = field(default=())


class Engine:
    """Requests in, embeddings out; owns the prepare thread pool and the batcher."""

    def __init__(self, backend: Backend, batcher: Batcher, settings: Settings) -> None:
        self.backend, self.batcher, self.settings = backend, batcher, settings
        self.limits = InputLimits(settings.max_input_bytes, settings.max_pixels)
        # Bounded: decoding is CPU work that competes with inference (decode_threads); shared
        # between requests in turn (prepare.py)
        self._pool = PreparePool(
            settings.decode_threads, processes=settings.decode_in == "processes"
        )
        # one decode chunk per model at a time: Decode rows never queue ahead of Embed batches
        # in a model's threads by more than one chunk
        self._decoding: dict[str, asyncio.Semaphore] = {}
        self.ready = False  # set by the app once the backend has started
        self._service_s: dict[str, float] = {}  # model → typical time of a small Embed call

    def close(self) -> None:
        self._pool.close()

    def deadline(self, timeout: float | None) -> float:
        """The ``time.monotonic()`` instant a call must be answered by: the server's
        ``request_timeout_s`` or the client's remaining time, whichever comes first. It covers
        every stage (decoding, queueing, inference)."""
        budget = min(self.settings.request_timeout_s, np.inf if timeout is None else timeout)
        return time.monotonic() + budget

    def _check_ready(self) -> None:
        if not self.ready:  # answering "no models" while they load would mislead clients
            raise Unavailable("the server is starting; models are loading", reason="NOT_READY")

    def model(self, name: str) -> EmbeddingModel:
        self._check_ready()
        model = self.backend.models().get(name)
        if model is None:
            known = ", ".join(sorted(self.backend.models())) or "none"
            shown = echo(name)  # a client's string: bounded before it goes into the status
            raise NotFound(f"no model {shown!r}; served models: {known}", metadata={"model": shown})
        return model

    def list_models(self, page_size: int, page_token: str) -> tuple[list[EmbeddingModel], str]:
        """One page of models in name order and the token of the next page ("" at the end)."""
        self._check_ready()
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative", field="page_size", reason="INVALID_REQUEST"
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        models = self.backend.models()
        names = [n for n in sorted(models) if after is None or n > after]
        page = names[:size]
        token = _encode_token(page[-1]) if len(names) > size else ""
        return [models[n] for n in page], token

    def pinned(self, name: str, version: str) -> EmbeddingModel:
        """The model ``name``; with ``version`` (not empty), only if it is the version served."""
        model = self.model(name)
        if version and version != model.spec.version:
            raise FailedPrecondition(
                f"model {model.spec.name!r} is served at version {model.spec.version}, not "
                f"{echo(version)!r}: embeddings of different versions are not comparable",
                reason="MODEL_VERSION_MISMATCH",
                metadata={
                    "model": model.spec.name,
                    "served_version": model.spec.version,
                    "requested_version": echo(version),
                },
            )
        return model

    async def embed(
        self,
        model_name: str,
        items: list[Item],
        projection: str,
        timeout: float | None = None,
        version: str = "",
        options: PrepareOptions | None = None,
    ) -> EmbedResult:
        """Embed ``items`` with one model (at ``version``, when not empty), prepared under
        ``options``; ``timeout`` is the client's remaining time, if any. The result holds each
        item's notes next to its row."""
        start = time.monotonic()
        deadline = self.deadline(timeout)
        model = self.pinned(model_name, version)
        pixels = self._check_request(model, items)
        small = len(items) <= self.settings.max_batch_items
        typical = self._service_s.get(model.spec.name, 0.0) if small else 0.0
        if timeout is not None and timeout < typical:
            # under overload calls reach us late (they wait in gRPC for the event loop): one
            # that cannot finish is refused before it costs decoding and a batch slot
            raise ResourceExhausted(
                f"{timeout:.3f} s left to the call, less than the {typical:.3f} s calls like it "
                f"take now on {model.spec.name!r}; retry with backoff",
                reason="DEADLINE_TOO_CLOSE",
                retry_after_s=typical,
            )
        try:
            chosen = model.resolve_projection(projection or None)
        except KeyError:
            known = ", ".join(p.name for p in model.projections())
            raise InvalidArgument(
                f"unknown projection {echo(projection)!r}; known: {known}",
                field="projection",
                reason="UNKNOWN_PROJECTION",
            ) from None
        options = options or PrepareOptions()
        now = await self._embed_alone(model, chosen, items, pixels, options, deadline)
        if now is not None:
            result, notes = now
        else:
            prepared, notes = await self._prepare(model, items, deadline, options)
            result = await self.batcher.submit(model, chosen, prepared, deadline)
        bad = np.flatnonzero(~np.isfinite(result.values).all(axis=1))
        if len(bad):  # finite inputs, so a model fault: never sent to the client
            raise NonFiniteOutput(
                f"model {model.spec.name!r} ({chosen}) gave non-finite values for inputs "
                f"{bad[:10].tolist()}"
            )
        info = next(p for p in model.projections() if p.name == chosen)
        if small:  # moving average of the time calls of at most one batch take, per model
            took, name = time.monotonic() - start, model.spec.name
            self._service_s[name] = 0.9 * self._service_s.get(name, took) + 0.1 * took
        return EmbedResult(
            model.spec.name,
            model.spec.version,
            chosen,
            info.invariant,
            result.values,
            result.poses,
            result.queue_seconds,
            result.inference_seconds,
            time.monotonic() - start,
            result.batch_size,
            notes,
        )

    async def decode(
        self,
        model_name: str,
        rows: list[np.ndarray],
        timeout: float | None = None,
        version: str = "",
        allow_inexact: bool = False,
    ) -> list[tuple[str, str, float | None]]:
        """Decode embeddings of ``model_name``'s default projection → (canonical SMILES, reason,
        distance) per row, "" where absent, distance None where no molecule was re-embedded (a
        decode that does not embed back to its row is refused unless ``allow_inexact``). Runs
        outside the batcher (decoding is rare), in backend batches of ``DECODE_CHUNK_ROWS`` rows,
        one per model at a time; ``timeout`` is the client's remaining time, if any."""
        deadline = self.deadline(timeout)
        model = self.pinned(model_name, version)
        if not model.can_decode:
            raise FailedPrecondition(
                f"model {model_name!r} has no decoder; Decode is served by molecule models",
                reason="NO_DECODER",
                metadata={"model": model_name},
            )
        self._check_count(len(rows), "embeddings")
        try:
            values = check_decode_values(model, rows)
        except InputError as exc:
            field = f"embeddings[{exc.index}].values"
            raise InvalidArgument(exc.reason, index=exc.index, field=field) from None
        turn = self._decoding.setdefault(model_name, asyncio.Semaphore(1))
        decoded: list[tuple[str, str, float | None]] = []
        try:
            for at in range(0, len(values), DECODE_CHUNK_ROWS):
                chunk = values[at : at + DECODE_CHUNK_ROWS]
                payload = serving.encode_decode_batch(chunk, allow_inexact)
                async with asyncio.timeout_at(loop_time(deadline)):
                    async with turn:
                        answer = await self.backend.run(model_name, payload)
                decoded += serving.decode_molecules(answer)
        except TimeoutError:
            raise DeadlineExceeded(
                f"decoding {len(rows)} embeddings did not finish within its deadline "
                f"({len(decoded)} done)"
            ) from None
        return decoded

    def _check_count(self, n: int, field: str) -> None:
        if not n:
            raise InvalidArgument(
                f"the request has no {field}", field=field, reason="INVALID_REQUEST"
            )
        if n > self.settings.max_inputs_per_request:
            raise InvalidArgument(
                f"{n} {field}, above the limit of {self.settings.max_inputs_per_request} "
                "per request; split the request",
                field=field,
                reason="TOO_MANY_INPUTS",
            )

    def _check_request(self, model: EmbeddingModel, items: list[Item]) -> int:
        """Refuses a request the model cannot take; returns the pixels its images hold."""
        self._check_count(len(items), "inputs")
        pixels = self._check_pixels(model, items)
        modality = model.spec.modality
        for i, (kind, _) in enumerate(items):
            if kind is None:
                raise InvalidArgument("no image or molecule set", index=i, field=f"inputs[{i}]")
            if kind != modality:
                raise InvalidArgument(
                    f"a {kind} was sent to model {model.spec.name!r}, which embeds {modality}s",
                    index=i,
                    field=f"inputs[{i}].{kind}",
                    reason="WRONG_MODALITY",
                )
        return pixels

    def _check_pixels(self, model: EmbeddingModel, items: list[Item]) -> int:
        """The pixels a request would decode, read from the image headers before decoding any
        (each image's own limit is ``max_pixels``; this bounds the request's total)."""
        limit, total = self.settings.max_request_pixels, 0
        for i, (kind, data) in enumerate(items):
            total += model.input_pixels(data)
            if total > limit:
                raise InvalidArgument(
                    f"the images up to this one hold {total} pixels, above the limit of {limit} "
                    "pixels decoded per request (--max-request-pixels); split the request",
                    index=i,
                    field=f"inputs[{i}].{_data_field(kind, data)}",
                    reason="TOO_MANY_PIXELS",
                )
        return total

    async def _embed_alone(
        self,
        model: EmbeddingModel,
        projection: str,
        items: list[Item],
        pixels: int,
        options: PrepareOptions,
        deadline: float,
    ) -> tuple[BatchResult, tuple[tuple[InputNote, ...], ...]] | None:
        """A lone small item of an idle model, decoded and embedded in the model's thread in
        one hand-off (``Batcher.run_alone``), or None for the usual path (decode threads, then
        the queue). At idle each hand-off wakes a sleeping thread and the event loop waits for
        it. Bounded by ``idle_direct_bytes`` (and ``IDLE_DIRECT_PIXELS`` for an image), since
        calls that arrive meanwhile wait behind it; not when decoding in processes (a
        decoder's crash must not reach the server)."""
        limit = self.settings.idle_direct_bytes
        if len(items) != 1 or not limit or self.settings.decode_in != "threads":
            return None
        kind, data = items[0]
        if len(data) > limit or pixels > IDLE_DIRECT_PIXELS:  # pixels read by _check_pixels
            return None
        prepare = _Prepare(model, self.limits, options)
        notes: list[tuple[InputNote, ...]] = []

        def prepared() -> np.ndarray:
            item, item_notes = prepare(data)
            notes.append(item_notes)
            return item

        try:
            result = await self.batcher.run_alone(model, projection, prepared, deadline)
        except InputError as exc:
            raise InvalidArgument(
                exc.reason, index=0, field=f"inputs[0].{_data_field(kind, data)}"
            ) from None
        return None if result is None else (result, (notes[0],))

    async def _prepare(
        self, model: EmbeddingModel, items: list[Item], deadline: float, options: PrepareOptions
    ) -> tuple[list[np.ndarray], tuple[tuple[InputNote, ...], ...]]:
        """The prepared items and their notes, both in request order."""
        prepare = _Prepare(model, self.limits, options)
        try:
            results = await self._pool.map(prepare, [data for _, data in items], deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                f"decoding {len(items)} inputs did not finish within the deadline"
            ) from None
        for i, ((kind, data), out) in enumerate(zip(items, results, strict=True)):
            if isinstance(out, InputError):  # the first bad item by index, deterministically
                field = f"inputs[{i}].{_data_field(kind, data)}"
                raise InvalidArgument(out.reason, index=i, field=field)
            if isinstance(out, BaseException):
                raise out
            if out is NOT_STARTED:  # only after a refused item, which the loop reports first
                raise AssertionError(f"input {i} was not prepared")
        return [item for item, _ in results], tuple(notes for _, notes in results)


DECODE_CHUNK_ROWS = 32
IDLE_DIRECT_PIXELS = 128 * 128  # an image decoded in the model's thread is at most this large


class NonFiniteOutput(RuntimeError):
    """A model answered NaN or infinity for finite inputs (INTERNAL: a server fault)."""


class _Prepare:
    """One request's preparation: ``model.prepare_noted`` of an item, here or (``remote``: the
    model's directory, picklable) in a decode worker process (prepare.py)."""

    def __init__(self, model: EmbeddingModel, limits: InputLimits, options: PrepareOptions):
        self.model, self.limits, self.options = model, limits, options
        self.remote = (prepare_remote, (str(model.spec.directory), limits, options))

    def __call__(self, data: bytes) -> tuple[np.ndarray, tuple[InputNote, ...]]:
        return self.model.prepare_noted(data, self.limits, self.options)


ECHO_LIMIT = 64


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """A client's string as errors may repeat it: at most ``limit`` characters, and the length
    when cut (an unbounded one made the status trailer too large for gRPC's metadata limit)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidArgument(
            "page_token is not a token this server issued",
            field="page_token",
            reason="INVALID_PAGE_TOKEN",
        ) from None
