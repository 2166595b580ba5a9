"""``Client``: a synchronous SDK over the ``quotient.v1.EmbeddingService`` gRPC API."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import numpy as np

from quotient_client._core import (
    API_KEY_ENV,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    BaseClient,
    DecodeJob,
    EmbedJob,
    ModelPager,
    choose_modality,
    is_request_stream,
    tls_credentials,
)
from quotient_client._embeddings import Embeddings
from quotient_client._errors import (
    DeadlineExceededError,
    ModelNotFoundError,
    error_from_rpc,
)
from quotient_client._health import health_check
from quotient_client._inputs import ImageLike
from quotient_client._models import DecodedMolecule, ModelInfo
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "Client",
    "tls_credentials",
]


class _Calls:
    """The calls in flight of one concurrent embed: the first failure stops them all (their
    gRPC calls are cancelled, the requests not yet sent are not sent, retry waits end)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._active: set[grpc.Future] = set()

    def run(self, start: Callable[..., grpc.Future], *args: Any, **kwargs: Any) -> Any:
        future = start(*args, **kwargs)
        with self._lock:
            self._active.add(future)
            if self.stopped.is_set():
                future.cancel()
        try:
            return future.result()
        finally:
            with self._lock:
                self._active.discard(future)

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            for future in self._active:
                future.cancel()


class Client(BaseClient):
    """A connection to a Quotient server.

    1. ``Client(target)`` opens a channel (lazily: nothing is sent until the first call).
       ``target`` is ``host:port`` (or any gRPC target, e.g. ``dns:///name:port``);
       ``grpcs://host[:port]`` turns TLS on (port 443 by default), ``grpc://host[:port]`` is
       plain text (port 50051). ``api_key`` (default: the environment variable
       ``QUOTIENT_API_KEY``) is sent with every call as ``authorization: Bearer <key>``. TLS:
       ``tls=True`` verifies the server against the system's CA bundle, ``tls_ca_file``
       against that bundle instead, and ``tls_cert_file`` with ``tls_key_file`` present a
       client certificate (mutual TLS); any of them turns TLS on. ``tls_server_name``
       overrides the name checked in the server's certificate. ``credentials``
       (``grpc.ChannelCredentials``) replaces all of them; ``metadata`` is sent with every call.
       ``load_balancing="round_robin"`` spreads calls over every address the target resolves
       to (a Kubernetes headless Service: ``dns:///quotient-headless.ns:50051``).
    2. ``embed`` / ``embed_images`` / ``embed_molecules`` split the caller's items into requests
       of at most ``batch_size`` items (and of the model's ``max_inputs_per_request``, and under
       ``max_message_bytes``), send up to ``concurrency`` of them at once (default: the
       client's, 1) and return one float32 row per item, in the caller's order; ``decode`` turns
       a molecule model's default embeddings back into molecules.
    3. Model descriptions are fetched once per name and cached; the default model of a modality
       is resolved through ``list_models`` once.
    4. ``close()`` (or leaving a ``with`` block) closes the channel.

    ``timeout`` (seconds, None for none) applies to each call; UNAVAILABLE and
    RESOURCE_EXHAUSTED are retried up to ``retries`` times (exponential backoff from
    ``retry_backoff`` seconds with full jitter, at most ``retry_backoff_max``, at least the
    server's retry hint); failures raise the typed subclasses of ``QuotientError``; item
    indices in them are the caller's. Thread-safe.
    """

    def _open(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.Channel:
        if credentials is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.EmbeddingServiceStub(channel)
        return channel

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Any, request: Any, offset: int = 0, calls: _Calls | None = None) -> Any:
        """One call, retried as the class docstring says. Nothing else is retried: a bad
        request stays bad. With ``calls``, the call can be stopped from another thread."""
        for attempt in itertools.count():
            try:
                if calls is None:
                    return method(request, timeout=self.timeout, metadata=self._metadata)
                return calls.run(
                    method.future, request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as err:
                delay = self._retry_delay(err, attempt, offset)
                if calls is None:
                    time.sleep(delay)
                elif calls.stopped.wait(delay):
                    raise error_from_rpc(err, offset) from err
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ models and health
    def health(self, service: str = "") -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or
        "UNKNOWN") of ``service``; "" asks about the server as a whole."""
        try:
            return health_check(self._channel, service, self.timeout, self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def wait_for_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until ``health(service)`` is "SERVING" (the server may still be starting or
        loading its models); raises ``DeadlineExceededError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                status = health_check(self._channel, service, 1.0, self._metadata)
            except grpc.RpcError as err:
                status = err.code().name if isinstance(err, grpc.Call) else "UNREACHABLE"
            if status == "SERVING":
                return
            time.sleep(0.1)
        raise DeadlineExceededError(
            f"{self.target} not SERVING after {timeout:g} s (last status {status})",
            code=grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    def list_models(self) -> list[ModelInfo]:
        """Every model the server serves, in name order (all pages)."""
        pager = ModelPager()
        while (request := pager.request()) is not None:
            pager.add(self._call(self._stub.ListModels, request))
        self._models.update((m.name, m) for m in pager.models)
        return pager.models

    def get_model(self, name: str) -> ModelInfo:
        """The description of model ``name``; raises ``ModelNotFoundError``."""
        info = ModelInfo.from_proto(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)))
        self._models[name] = info
        return info

    def _model(self, name: str | None, modality: str) -> ModelInfo:
        name = self._known(name, modality) or self._default(self.list_models(), modality)
        return self._checked(self._models.get(name) or self.get_model(name), modality)

    def _choose(
        self, items: Any, modality: str | None, model: str | None
    ) -> tuple[ModelInfo, str, Any]:
        """The model and modality of an ``embed`` call (``choose_modality`` says how), and the
        items again."""
        info = (self._models.get(model) or self.get_model(model)) if model is not None else None
        served = self.list_models() if model is None and modality is None else None
        modality, items = choose_modality(items, modality, info, served)
        return self._model(model, modality), modality, items

    # ------------------------------------------------------------------ embeddings
    def embed(
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
        """Embed images or molecules → ``Embeddings``: float32 ``vectors`` [n, dimension] in
        the caller's order, ``poses`` (NaN where the projection computes none), ``notes`` (per
        row, what the server changed in the input or ignored of it: a molecule's standardisation,
        its stereochemistry; ``InputNote``) and their ``spec`` (model, the version that answered,
        projection, dimension, metric), which the vector stores, clustering and exports check.

        ``modality`` ("image" or "molecule") defaults to ``model``'s, else to the only one the
        server serves, else to what the items are (arrays, PIL images, bytes and ``Path``\\s
        are images, RDKit ``Mol``\\s molecules); ``str`` items are ambiguous (a path or a
        SMILES) and need ``modality`` or ``model``. Items as for ``embed_images`` /
        ``embed_molecules``; ``batch_size`` defaults to 64 images or 256 molecules a request.
        ``concurrency`` requests are in flight at once (default: the client's); the first
        failure stops the others and raises, naming the caller's item index. ``progress``:
        None shows a bar on stderr when it is a terminal and the call takes more than one
        request (needs tqdm); True or False force it. ``standardize``: None (the default) or
        True, the model's standardisation of molecules applies (``ModelInfo.input_limits.
        standardization``); False, molecules are embedded as sent, and a salt or mixture is
        refused (``InvalidInputError``)."""
        info, modality, items = self._choose(items, modality, model)
        job, inputs = self._job(
            info, modality, items, projection, model_version, batch_size, progress, standardize
        )
        self._run(job, inputs, self._workers(concurrency))
        return job.embeddings()

    @overload
    def embed_images(
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
    def embed_images(
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
    @overload
    def embed_images(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = ...,
        projection: str | None = ...,
        model_version: str | None = ...,
        batch_size: int = ...,
        return_poses: bool,
        concurrency: int | None = ...,
        progress: bool | None = ...,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    def embed_images(
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
        """Embed one image or an iterable of images → float32 array [n, dimension].

        An image is a file path (str or ``os.PathLike``), encoded file bytes (PNG, JPEG, ...), a
        numpy array (HxW or HxWx{1,3,4}; uint8, or float in [0, 1]) or a PIL image. ``model``
        defaults to the server's only image model; ``projection`` to the model's default. With
        ``return_poses`` the answer is ``(embeddings, poses)``, poses [n] float64 in degrees
        (the rotation of each image relative to the model's canonical orientation; only
        differences between poses are meaningful); a projection that computes no pose raises
        ``ValueError``. Bad local items raise ``ValueError`` (``TypeError``, ``OSError`` for
        unreadable paths) naming the item's index. ``model_version`` pins the model's
        version: a server serving another raises ``FailedPreconditionError`` (reason
        ``MODEL_VERSION_MISMATCH``); without it, a call whose requests were answered by
        different versions (the server was upgraded meanwhile) raises ``QuotientError``.
        ``concurrency`` and ``progress`` as for ``embed``.
        """
        info = self._model(model, "image")
        job, inputs = self._job(
            info, "image", images, projection, model_version, batch_size, progress
        )
        if return_poses:
            job.check_poses()
        self._run(job, inputs, self._workers(concurrency))
        values, poses = job.arrays()
        return (values, poses) if return_poses else values

    def embed_molecules(
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
        """Embed one molecule or an iterable of them → float32 array [n, dimension]. A molecule
        is a SMILES str, MolBlock or single-record SDF text (a str with line breaks), or an
        RDKit ``Mol``. ``model`` defaults to the server's only molecule model;
        ``model_version`` as for ``embed_images``, ``concurrency``, ``progress`` and
        ``standardize`` as for ``embed`` (which also returns the notes of each input)."""
        info = self._model(model, "molecule")
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
        self._run(job, inputs, self._workers(concurrency))
        return job.arrays()[0]

    def _run(self, job: EmbedJob, inputs: Iterable[pb.Input], concurrency: int) -> None:
        """Send ``job``'s requests, at most ``concurrency`` at once; inputs are encoded only as
        room frees up (one request ahead), so a long iterator never sits in memory."""
        try:
            if concurrency == 1:
                for start, count, request in job.requests(inputs):
                    job.answer(start, count, self._embed_call(job, request, start))
                return
            calls = _Calls()
            pending: dict[Future[pb.EmbedResponse], tuple[int, int]] = {}
            with ThreadPoolExecutor(concurrency, thread_name_prefix="quotient-embed") as pool:
                try:
                    for start, count, request in job.requests(inputs):
                        while len(pending) >= concurrency:
                            _settle(job, pending)
                        submitted = pool.submit(self._embed_call, job, request, start, calls)
                        pending[submitted] = start, count
                    while pending:
                        _settle(job, pending)
                except BaseException:
                    calls.stop()
                    for future in pending:
                        future.cancel()
                    raise
        finally:
            job.close()

    def _embed_call(
        self, job: EmbedJob, request: pb.EmbedRequest, start: int, calls: _Calls | None = None
    ) -> pb.EmbedResponse:
        try:
            return self._call(self._stub.Embed, request, offset=start, calls=calls)
        except ModelNotFoundError:
            self._forget(job.info.name)
            raise

    def decode(
        self,
        embeddings: np.ndarray | Sequence[Sequence[float]],
        *,
        model: str | None = None,
        model_version: str | None = None,
        batch_size: int = 256,
        allow_inexact: bool = False,
    ) -> list[DecodedMolecule]:
        """Decode embeddings of a model's default projection (rows of ``embed_molecules``'s
        answer) → one ``DecodedMolecule`` per row, in order: canonical SMILES, or ``reason`` when
        the decoded graph is not a valid molecule or the molecule does not embed back to the row
        (its ``distance`` beyond the model's tolerance; ``allow_inexact=True`` returns it anyway,
        for embeddings no molecule made, such as interpolations). ``model`` defaults to the
        server's only molecule model; a model without a decoder raises
        ``FailedPreconditionError``, and so does a ``model_version`` the server does not serve
        (embeddings decode only with the version that made them)."""
        name = model if model is not None else self._model(None, "molecule").name
        job = DecodeJob.of(
            embeddings, name, self._models.get(name), batch_size, model_version, allow_inexact
        )
        for start, request in job.requests():
            job.answer(request, self._call(self._stub.Decode, request, offset=start))
        return job.molecules

    # ------------------------------------------------------------------ streams
    def embed_stream(
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
    ) -> Iterator[Any]:
        """Embed over one ``EmbedStream``: the requests are sent while the answers come back.

        With the same items as ``embed`` (and the same ``modality``, ``model``, ...), yields one
        ``Embeddings`` per request (``batch_size`` items each, the last one shorter), in the
        caller's order; a failed request raises its typed error, naming the caller's item
        index, after the answers before it. Low-level: with protobuf ``EmbedRequest``\\s,
        yields one ``EmbedStreamResponse`` per request, in order, a failed request answered in
        the stream (``response.error``; ``error_from_status`` turns it into the exception).
        A failure of the stream itself raises ``QuotientError``; ``timeout`` bounds the whole
        stream (None: unbounded); streams are not retried."""
        raw, items = is_request_stream(items)
        if raw:
            return self._raw_stream(items, timeout)
        info, modality, items = self._choose(items, modality, model)
        job, inputs = self._job(
            info, modality, items, projection, model_version, batch_size, progress, standardize
        )
        return self._stream(job, inputs, timeout)

    def _raw_stream(
        self, requests: Iterable[pb.EmbedRequest], timeout: float | None
    ) -> Iterator[pb.EmbedStreamResponse]:
        try:
            yield from self._stub.EmbedStream(
                iter(requests), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def _stream(
        self, job: EmbedJob, inputs: Iterable[pb.Input], timeout: float | None
    ) -> Iterator[Embeddings]:
        # gRPC draws the requests in a thread of its own and would swallow an error there (a
        # bad item): keep it, end the requests, and raise it here after the answers before it.
        sent: collections.deque[tuple[int, int]] = collections.deque()
        failed: list[BaseException] = []

        def requests() -> Iterator[pb.EmbedRequest]:
            try:
                for start, count, request in job.requests(inputs):
                    sent.append((start, count))
                    yield request
            except Exception as exc:
                failed.append(exc)

        try:
            for answer in self._stub.EmbedStream(
                requests(), timeout=timeout, metadata=self._metadata
            ):
                yield job.stream_answer(*sent.popleft(), answer)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            job.close()
        if failed:
            raise failed[0]


def _settle(job: EmbedJob, pending: dict[Future[pb.EmbedResponse], tuple[int, int]]) -> None:
    """Wait for one or more of the calls in flight and take their answers (raising the first
    failure)."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        start, count = pending.pop(future)
        job.answer(start, count, future.result())
