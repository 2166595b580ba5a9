"""``AsyncClient``: the asyncio twin of ``Client``, over ``grpc.aio``.

The arguments, the methods and what they return are ``Client``'s (its docstrings hold for these);
each method is a coroutine, ``embed_stream`` an async iterator. What the two share (settings,
retry policy, model choice, request planning, answers) lives in ``_core``; only the sending is
written here again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import grpc.aio
import numpy as np
from google.protobuf import wrappers_pb2

from quotient_client._core import (
    BaseClient,
    DecodeJob,
    EmbedJob,
    ModelPager,
    choose_modality,
    is_request_stream,
)
from quotient_client._embeddings import Embeddings
from quotient_client._errors import DeadlineExceededError, ModelNotFoundError, error_from_rpc
from quotient_client._health import health_method, status_name
from quotient_client._inputs import ImageLike
from quotient_client._models import DecodedMolecule, ModelInfo
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """A connection to a Quotient server for asyncio code: ``Client``'s arguments and methods,
    awaited.

    1. ``AsyncClient(target, ...)`` inside a running event loop opens a ``grpc.aio`` channel
       (lazily); ``async with AsyncClient(...) as client:`` closes it at the end.
    2. ``await client.embed(items)`` (``embed_images``, ``embed_molecules``, ``decode``,
       ``list_models``, ``get_model``, ``health``, ``wait_for_serving``) as ``Client``'s;
       ``concurrency`` requests of one call are in flight at once, as tasks of the loop.
    3. ``async for chunk in client.embed_stream(items):`` one ``Embeddings`` per request (or,
       given ``EmbedRequest``\\s, one ``EmbedStreamResponse`` each).

    Items are encoded on the loop's thread as requests are made (PNG encoding of arrays, file
    reads); retries wait with ``asyncio.sleep``.
    """

    def _open(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.aio.Channel:
        try:
            asyncio.get_running_loop()  # a grpc.aio channel belongs to the loop it is made in
        except RuntimeError:
            raise RuntimeError(
                "create an AsyncClient inside a running event loop (in a coroutine, e.g. "
                "`async with AsyncClient(...)` under asyncio.run); elsewhere use Client"
            ) from None
        if credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.EmbeddingServiceStub(channel)
        return channel

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def _call(self, method: Any, request: Any, offset: int = 0) -> Any:
        for attempt in itertools.count():
            try:
                return await method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                await asyncio.sleep(self._retry_delay(err, attempt, offset))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ models and health
    async def health(self, service: str = "") -> str:
        """As ``Client.health``."""
        return await self._health(service, self.timeout, raise_typed=True)

    async def _health(self, service: str, timeout: float | None, raise_typed: bool) -> str:
        check = health_method(self._channel)
        request = wrappers_pb2.StringValue(value=service)
        try:
            return status_name(await check(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as err:
            try:
                return status_name(None, err)
            except grpc.RpcError:
                if raise_typed:
                    raise error_from_rpc(err) from err
                code = getattr(err, "code", None)
                return code().name if code is not None else "UNREACHABLE"

    async def wait_for_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """As ``Client.wait_for_serving``."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            status = await self._health(service, 1.0, raise_typed=False)
            if status == "SERVING":
                return
            await asyncio.sleep(0.1)
        raise DeadlineExceededError(
            f"{self.target} not SERVING after {timeout:g} s (last status {status})",
            code=grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    async def list_models(self) -> list[ModelInfo]:
        """As ``Client.list_models``."""
        pager = ModelPager()
        while (request := pager.request()) is not None:
            pager.add(await self._call(self._stub.ListModels, request))
        self._models.update((m.name, m) for m in pager.models)
        return pager.models

    async def get_model(self, name: str) -> ModelInfo:
        """As ``Client.get_model``."""
        request = pb.GetModelRequest(name=name)
        info = ModelInfo.from_proto(await self._call(self._stub.GetModel, request))
        self._models[name] = info
        return info

    async def _model(self, name: str | None, modality: str) -> ModelInfo:
        name = self._known(name, modality) or self._default(await self.list_models(), modality)
        return self._checked(self._models.get(name) or await self.get_model(name), modality)

    async def _choose(
        self, items: Any, modality: str | None, model: str | None
    ) -> tuple[ModelInfo, str, Any]:
        info = None
        if model is not None:
            info = self._models.get(model) or await self.get_model(model)
        served = await self.list_models() if model is None and modality is None else None
        modality, items = choose_modality(items, modality, info, served)
        return await self._model(model, modality), modality, items

    # ------------------------------------------------------------------ embeddings
    async def embed(
        self,
        items: Any,
        *,
        modality: str | None = None,
        model: str | None = None,
        projection: str | None = None,
        model_version: str | None = None,
        batch_size: int | None = None,
        concurrency: int | None = None,
        progress: bool | None = None,
        standardize: bool | None = None,
    ) -> Embeddings:
        """As ``Client.embed``."""
        info, modality, items = await self._choose(items, modality, model)
        job, inputs = self._job(
            info, modality, items, projection, model_version, batch_size, progress, standardize
        )
        await self._run(job, inputs, self._workers(concurrency))
        return job.embeddings()

    @overload
    async def embed_images(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = ...,
        projection: str | None = ...,
        model_version: str | None = ...,
        batch_size: int = ...,
        return_poses: Literal[False] = ...,
        concurrency: int | None = ...,
        progress: bool | None = ...,
    ) -> np.ndarray: ...
    @overload
    async def embed_images(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = ...,
        projection: str | None = ...,
        model_version: str | None = ...,
        batch_size: int = ...,
        return_poses: Literal[True],
        concurrency: int | None = ...,
        progress: bool | None = ...,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    async def embed_images(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = None,
        projection: str | None = None,
        model_version: str | None = None,
        batch_size: int = 64,
        return_poses: bool = False,
        concurrency: int | None = None,
        progress: bool | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As ``Client.embed_images``."""
        info = await self._model(model, "image")
        job, inputs = self._job(
            info, "image", images, projection, model_version, batch_size, progress
        )
        if return_poses:
            job.check_poses()
        await self._run(job, inputs, self._workers(concurrency))
        values, poses = job.arrays()
        return (values, poses) if return_poses else values

    async def embed_molecules(
        self,
        molecules: Any,
        *,
        model: str | None = None,
        projection: str | None = None,
        model_version: str | None = None,
        batch_size: int = 256,
        concurrency: int | None = None,
        progress: bool | None = None,
        standardize: bool | None = None,
    ) -> np.ndarray:
        """As ``Client.embed_molecules``."""
        info = await self._model(model, "molecule")
        job, inputs = self._job(
            info,
            "molecule",
            molecules,
            projection,
            model_version,
            batch_size,
            progress,
            standardize,
        )
        await self._run(job, inputs, self._workers(concurrency))
        return job.arrays()[0]

    async def _run(self, job: EmbedJob, inputs: Iterable[pb.Input], concurrency: int) -> None:
        """``job``'s requests as tasks, at most ``concurrency`` at once; the first failure
        cancels the others."""
        pending: dict[asyncio.Future[pb.EmbedResponse], tuple[int, int]] = {}
        try:
            for start, count, request in job.requests(inputs):
                while len(pending) >= concurrency:
                    await _settle(job, pending)
                pending[asyncio.ensure_future(self._embed_call(job, request, start))] = start, count
            while pending:
                await _settle(job, pending)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            job.close()

    async def _embed_call(
        self, job: EmbedJob, request: pb.EmbedRequest, start: int
    ) -> pb.EmbedResponse:
        try:
            return await self._call(self._stub.Embed, request, offset=start)
        except ModelNotFoundError:
            self._forget(job.info.name)
            raise

    async def decode(
        self,
        embeddings: np.ndarray | Sequence[Sequence[float]],
        *,
        model: str | None = None,
        model_version: str | None = None,
        batch_size: int = 256,
        allow_inexact: bool = False,
    ) -> list[DecodedMolecule]:
        """As ``Client.decode``."""
        name = model if model is not None else (await self._model(None, "molecule")).name
        job = DecodeJob.of(
            embeddings, name, self._models.get(name), batch_size, model_version, allow_inexact
        )
        for start, request in job.requests():
            job.answer(request, await self._call(self._stub.Decode, request, offset=start))
        return job.molecules

    # ------------------------------------------------------------------ streams
    async def embed_stream(
        self,
        items: Any,
        *,
        modality: str | None = None,
        model: str | None = None,
        projection: str | None = None,
        model_version: str | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        standardize: bool | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """As ``Client.embed_stream``: ``async for`` over one ``Embeddings`` per request, or one
        ``EmbedStreamResponse`` per protobuf ``EmbedRequest``."""
        raw, items = is_request_stream(items)
        job = None
        planned: Iterator[tuple[int, int, pb.EmbedRequest]]
        if raw:
            planned = ((0, 0, request) for request in items)
        else:
            info, modality, items = await self._choose(items, modality, model)
            job, inputs = self._job(
                info, modality, items, projection, model_version, batch_size, progress, standardize
            )
            planned = job.requests(inputs)
        call = self._stub.EmbedStream(timeout=timeout, metadata=self._metadata)
        sent: collections.deque[tuple[int, int]] = collections.deque()
        writer = asyncio.ensure_future(_write(call, planned, sent))
        try:
            while (answer := await call.read()) is not grpc.aio.EOF:
                yield answer if job is None else job.stream_answer(*sent.popleft(), answer)
            await writer  # a bad item raises here, after the answers before it
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            writer.cancel()
            if writer.done() and not writer.cancelled():
                writer.exception()  # retrieved: the stream's own error was raised instead
            call.cancel()
            if job is not None:
                job.close()


async def _write(call: Any, planned: Iterable[tuple[int, int, pb.EmbedRequest]], sent: Any) -> None:
    """Write the requests of a stream, then half-close it, also when making a request fails
    (that error is raised by the reader, once the answers before it are in)."""
    try:
        for start, count, request in planned:
            sent.append((start, count))
            await call.write(request)
    finally:
        if not call.done():
            await call.done_writing()


async def _settle(job: EmbedJob, pending: dict[asyncio.Future[Any], tuple[int, int]]) -> None:
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        start, count = pending.pop(task)
        job.answer(start, count, task.result())
