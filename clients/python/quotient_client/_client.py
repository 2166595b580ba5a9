"""``Client``: a synchronous SDK over the ``quotient.v1.EmbeddingService`` gRPC API."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import grpc
import numpy as np

from quotient.v1 import embedding_service_pb2 as pb
from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_client._errors import (
    DeadlineExceededError,
    ModelNotFoundError,
    QuotientError,
    ServerBusyError,
    ServiceUnavailableError,
    error_from_rpc,
)
from quotient_client._health import health_check
from quotient_client._inputs import ImageLike, chunk_inputs, image_inputs, molecule_inputs
from quotient_client._models import DecodedMolecule, ModelInfo

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "Client",
    "tls_credentials",
]

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "QUOTIENT_API_KEY"
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20  # the server's default --max-message-bytes
_MESSAGE_SLACK = 64 << 10  # room for the request's other fields next to its inputs

Metadata = Sequence[tuple[str, str]] | Mapping[str, str]


_RETRYABLE = (ServiceUnavailableError, ServerBusyError)


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {os.fspath(path)!r}: {exc.strerror}") from None


def tls_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: ``ca_file`` to verify the server (None: the
    system's bundle), ``cert_file`` with ``key_file`` for a client certificate (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_cert_file and tls_key_file go together (mutual TLS needs both)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "tls_ca_file"),
        private_key=_read(key_file, "tls_key_file"),
        certificate_chain=_read(cert_file, "tls_cert_file"),
    )


class Client:
    """A connection to a Quotient server.

    1. ``Client(target)`` opens a channel (lazily: nothing is sent until the first call).
       ``api_key`` (default: the environment variable ``QUOTIENT_API_KEY``) is sent with every
       call as ``authorization: Bearer <key>``. TLS: ``tls=True`` verifies the server against
       the system's CA bundle, ``tls_ca_file`` against that bundle instead, and ``tls_cert_file``
       with ``tls_key_file`` present a client certificate (mutual TLS); any of them turns TLS on.
       ``tls_server_name`` overrides the name checked in the server's certificate. ``credentials``
       (``grpc.ChannelCredentials``) replaces all of them; ``metadata`` is sent with every call.
       ``load_balancing="round_robin"`` spreads calls over every address the target resolves
       to (a Kubernetes headless Service: ``dns:///quotient-headless.ns:50051``).
    2. ``embed_images`` / ``embed_molecules`` split the caller's items into requests of at most
       ``batch_size`` items (and of the model's ``max_inputs_per_request``, and under
       ``max_message_bytes``), send them in order and return one float32 row per item;
       ``decode`` turns a molecule model's default embeddings back into molecules.
    3. Model descriptions are fetched once per name and cached; the default model of a modality
       is resolved through ``list_models`` once.
    4. ``close()`` (or leaving a ``with`` block) closes the channel.

    ``timeout`` (seconds, None for none) applies to each call; failures raise the typed
    subclasses of ``QuotientError``; item indices in them are the caller's. Thread-safe.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca_file: str | os.PathLike[str] | None = None,
        tls_cert_file: str | os.PathLike[str] | None = None,
        tls_key_file: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        load_balancing: str | None = None,
        retries: int = 3,
        retry_backoff: float = 0.1,
        retry_backoff_max: float = 10.0,
    ) -> None:
        if retries < 0 or retry_backoff < 0 or retry_backoff_max < retry_backoff:
            raise ValueError(
                "retries and retry_backoff must not be negative, and retry_backoff_max must be at "
                f"least retry_backoff (got {retries}, {retry_backoff}, {retry_backoff_max})"
            )
        self.retries, self.retry_backoff, self.retry_backoff_max = (
            retries,
            retry_backoff,
            retry_backoff_max,
        )
        self.retried = 0  # retries made so far, all calls together
        self.target, self.timeout, self.max_message_bytes = target, timeout, max_message_bytes
        pairs = list(metadata.items() if isinstance(metadata, Mapping) else (metadata or ()))
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if api_key:
            if any(k.lower() == "authorization" for k, _ in pairs):
                raise ValueError("pass either api_key or an 'authorization' metadata entry")
            pairs.append(("authorization", f"Bearer {api_key.strip()}"))
        self._metadata: tuple[tuple[str, str], ...] | None = tuple(pairs) or None
        channel_options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        if load_balancing:
            config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
            channel_options.append(("grpc.service_config", json.dumps(config)))
        channel_options += list(options or ())
        if credentials is None and (tls or tls_ca_file or tls_cert_file or tls_key_file):
            credentials = tls_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._models: dict[str, ModelInfo] = {}
        self._defaults: dict[str, str] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def _call(self, method: Any, request: Any, offset: int = 0) -> Any:
        """One call; UNAVAILABLE and RESOURCE_EXHAUSTED are retried up to ``retries`` times,
        after exponential backoff with full jitter, and at least the server's retry hint.
        Nothing else is retried: a bad request stays bad."""
        for attempt in itertools.count():
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                error = error_from_rpc(err, offset)
                if attempt >= self.retries or not isinstance(error, _RETRYABLE):
                    raise error from err
                ceiling = min(self.retry_backoff_max, self.retry_backoff * 2**attempt)
                hint = error.retry_after or 0.0
                time.sleep(min(self.retry_backoff_max, max(hint, random.uniform(0, ceiling))))
                self.retried += 1
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
        models: list[ModelInfo] = []
        token, seen = "", set()
        while True:
            page = self._call(self._stub.ListModels, pb.ListModelsRequest(page_token=token))
            models += [ModelInfo.from_proto(m) for m in page.models]
            token = page.next_page_token
            if not token or token in seen:  # a repeated token would loop forever
                break
            seen.add(token)
        self._models.update((m.name, m) for m in models)
        return models

    def get_model(self, name: str) -> ModelInfo:
        """The description of model ``name``; raises ``ModelNotFoundError``."""
        info = ModelInfo.from_proto(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)))
        self._models[name] = info
        return info

    def _model(self, name: str | None, modality: str) -> ModelInfo:
        if name is None:
            if modality not in self._defaults:
                names = [m.name for m in self.list_models() if m.modality == modality]
                if not names:
                    raise ModelNotFoundError(
                        f"the server at {self.target} serves no {modality} model",
                        code=grpc.StatusCode.NOT_FOUND,
                    )
                if len(names) > 1:
                    raise ValueError(
                        f"the server serves several {modality} models "
                        f"({', '.join(names)}); choose one with model=..."
                    )
                self._defaults[modality] = names[0]
            name = self._defaults[modality]
        info = self._models.get(name) or self.get_model(name)
        if info.modality not in (modality, "unspecified"):
            raise ValueError(f"model {name!r} embeds {info.modality}s, not {modality}s")
        return info

    # ------------------------------------------------------------------ embeddings
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
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Embed one image or an iterable of images → float32 array [n, dimension].

        An image is a file path (str or ``os.PathLike``), encoded file bytes (PNG, JPEG, ...), a
        numpy array (HxW or HxWx{1,3,4}; uint8, or float in [0, 1]) or a PIL image. ``model``
        defaults to the server's only image model; ``projection`` to the model's default. With
        ``return_poses`` the answer is ``(embeddings, poses)``, poses [n] float64 in degrees, NaN
        where the projection computes none. Bad local items raise ``ValueError`` (``TypeError``,
        ``OSError`` for unreadable paths) naming the item's index. ``model_version`` pins the
        model's version: a server serving another raises ``FailedPreconditionError`` (reason
        ``MODEL_VERSION_MISMATCH``); without it, a call whose requests were answered by
        different versions (the server was upgraded meanwhile) raises ``QuotientError``.
        """
        values, poses = self._embed(
            "image", image_inputs(images), model, projection, batch_size, model_version
        )
        return (values, poses) if return_poses else values

    def embed_molecules(
        self,
        molecules: Any,
        *,
        model: str | None = None,
        projection: str | None = None,
        model_version: str | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Embed one molecule or an iterable of them → float32 array [n, dimension]. A molecule
        is a SMILES str, MolBlock or single-record SDF text (a str with line breaks), or an
        RDKit ``Mol``. ``model`` defaults to the server's only molecule model;
        ``model_version`` as for ``embed_images``."""
        inputs = molecule_inputs(molecules)
        return self._embed("molecule", inputs, model, projection, batch_size, model_version)[0]

    def decode(
        self,
        embeddings: np.ndarray | Sequence[Sequence[float]],
        *,
        model: str | None = None,
        model_version: str | None = None,
        batch_size: int = 256,
    ) -> list[DecodedMolecule]:
        """Decode embeddings of a model's default projection (rows of ``embed_molecules``'s
        answer) → one ``DecodedMolecule`` per row, in order: canonical SMILES, or ``reason`` when
        the decoded graph is not a valid molecule. ``model`` defaults to the server's only
        molecule model; a model without a decoder raises ``FailedPreconditionError``, and so
        does a ``model_version`` the server does not serve (embeddings decode only with the
        version that made them)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = [np.asarray(row, np.float32).ravel() for row in embeddings]
        name = model if model is not None else self._model(None, "molecule").name
        cached = self._models.get(name)
        limit = cached.input_limits.max_inputs_per_request if cached is not None else 0
        per_request = min(batch_size, limit) if limit > 0 else batch_size
        out: list[DecodedMolecule] = []
        for start in range(0, len(rows), per_request):
            chunk = rows[start : start + per_request]
            request = pb.DecodeRequest(
                model=name,
                embeddings=[pb.Embedding(values=r.tolist()) for r in chunk],
                model_version=model_version or "",
            )
            response = self._call(self._stub.Decode, request, offset=start)
            if len(response.molecules) != len(chunk):
                raise QuotientError(
                    f"the server returned {len(response.molecules)} molecules for "
                    f"{len(chunk)} embeddings"
                )
            out += [DecodedMolecule(m.smiles or None, m.reason or None) for m in response.molecules]
        return out

    def _embed(
        self,
        modality: str,
        inputs: Iterable[pb.Input],
        model: str | None,
        projection: str | None,
        batch_size: int,
        model_version: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        info = self._model(model, modality)
        limit = info.input_limits.max_inputs_per_request
        per_request = min(batch_size, limit) if limit > 0 else batch_size
        values, poses, versions = [], [], set()
        for start, chunk in chunk_inputs(
            inputs, per_request, self.max_message_bytes - _MESSAGE_SLACK
        ):
            request = pb.EmbedRequest(
                model=info.name,
                inputs=chunk,
                projection=projection or "",
                model_version=model_version or "",
            )
            try:
                response = self._call(self._stub.Embed, request, offset=start)
            except ModelNotFoundError:  # the server's models changed: forget what we cached
                self._models.pop(info.name, None)
                self._defaults.clear()
                raise
            versions.add(response.model_version)
            if len(versions) > 1:
                raise QuotientError(
                    f"model {info.name!r} changed version during this call "
                    f"({', '.join(sorted(versions))}): its embeddings are not comparable; "
                    "embed again, or pin model_version="
                )
            chunk_values, chunk_poses = _decode(response, len(chunk))
            values.append(chunk_values)
            poses.append(chunk_poses)
        if not values:
            described = info.projection(projection)
            dimension = described.dimension if described is not None else 0
            return np.zeros((0, dimension), np.float32), np.zeros(0, np.float64)
        return np.concatenate(values), np.concatenate(poses)

    def embed_stream(
        self, requests: Iterable[pb.EmbedRequest], *, timeout: float | None = None
    ) -> Iterator[pb.EmbedStreamResponse]:
        """Low-level ``EmbedStream``: one ``EmbedStreamResponse`` per request, in order. A failed
        request is answered in the stream (``response.error``; turn it into an exception with
        ``error_from_status``); a failure of the stream itself raises ``QuotientError``.
        ``timeout`` bounds the whole stream (None: unbounded)."""
        try:
            yield from self._stub.EmbedStream(
                iter(requests), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err


def _decode(response: pb.EmbedResponse, expected: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings = response.embeddings
    if len(embeddings) != expected:
        raise QuotientError(
            f"the server returned {len(embeddings)} embeddings for {expected} inputs"
        )
    dimension = len(embeddings[0].values)
    flat = np.fromiter(itertools.chain.from_iterable(e.values for e in embeddings), np.float32)
    if flat.size != expected * dimension:
        raise QuotientError("the server returned embeddings of different lengths")
    poses = np.array(
        [e.pose.rotation_degrees if e.HasField("pose") else np.nan for e in embeddings], np.float64
    )
    return flat.reshape(expected, dimension), poses
