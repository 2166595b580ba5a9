"""What the synchronous ``Client`` and the asyncio ``AsyncClient`` share.

Everything here is independent of how a call is made: the channel's settings (target names such
as ``grpcs://host:443``, TLS, the API key), the retry policy, picking a model and a modality, and
the plan of an embed or decode call (requests out, answers in, progress). The two clients only
send the requests, each in its own way.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import numpy as np
from PIL import Image

from quotient_client._embeddings import Embeddings, EmbeddingSpec
from quotient_client._errors import (
    ModelNotFoundError,
    QuotientError,
    ServerBusyError,
    ServiceUnavailableError,
    error_from_rpc,
    error_from_status,
)
from quotient_client._inputs import chunk_inputs, image_inputs, is_rdkit_mol, molecule_inputs
from quotient_client._models import DecodedMolecule, ModelInfo
from quotient_client._notes import InputNote, notes_from_proto
from quotient_client.proto import embedding_service_pb2 as pb

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "BaseClient",
    "DecodeJob",
    "EmbedJob",
    "ModelPager",
    "choose_modality",
    "is_request_stream",
    "tls_credentials",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_PORT = {"grpc": 50051, "grpcs": 443}
API_KEY_ENV = "QUOTIENT_API_KEY"
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20  # the server's default --max-message-bytes
MESSAGE_SLACK = 64 << 10  # room for the request's other fields next to its inputs
BATCH_SIZE = {"image": 64, "molecule": 256}
MODALITIES = tuple(BATCH_SIZE)

Metadata = Sequence[tuple[str, str]] | Mapping[str, str]

_RETRYABLE = (ServiceUnavailableError, ServerBusyError)
# Client.embed(standardize=...) → EmbedRequest.standardization
_STANDARDIZATION = {
    None: pb.STANDARDIZATION_UNSPECIFIED,
    True: pb.STANDARDIZATION_MODEL_POLICY,
    False: pb.STANDARDIZATION_NONE,
}
Notes = tuple[tuple[InputNote, ...], ...]
# Items that are one item, never an iterable of items (a str is a path or a SMILES; an array
# is one image).
_SINGLE = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)
_NOTHING = object()


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


def parse_target(target: str) -> tuple[str, bool | None]:
    """``target`` → (gRPC address, TLS). ``grpcs://host[:port]`` is TLS (port 443 by default),
    ``grpc://host[:port]`` plain text (port 50051); anything else (``host:port``,
    ``dns:///name:port``, ``unix:path``) is passed to gRPC as it is, TLS None (not said)."""
    scheme = target.split("://", 1)[0].lower() if "://" in target else ""
    if scheme in ("http", "https"):
        raise ValueError(
            f"target {target!r}: gRPC does not speak {scheme}://; use grpcs://host:port for TLS "
            "or grpc://host:port (or host:port) for plain text"
        )
    if scheme not in DEFAULT_PORT:
        return target, None
    parts = urlsplit(target)
    if parts.username or parts.password:
        raise ValueError(f"target {target!r}: pass the key as api_key=..., not in the address")
    if parts.path not in ("", "/") or parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"target {target!r}: expected {scheme}://host[:port] and nothing more")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or DEFAULT_PORT[scheme]}", scheme == "grpcs"


def peek(items: Any) -> tuple[Any, Any]:
    """(first item or ``_NOTHING``, the items again with that one still in them) for an iterable
    of items; a lone item (a str, an array, ...) is its own first item."""
    if isinstance(items, _SINGLE) or is_rdkit_mol(items) or not isinstance(items, Iterable):
        return items, items
    if isinstance(items, Sequence):
        return (items[0] if len(items) else _NOTHING), items
    iterator = iter(items)
    first = next(iterator, _NOTHING)
    return first, (iterator if first is _NOTHING else itertools.chain([first], iterator))


def is_request_stream(items: Any) -> tuple[bool, Any]:
    """(whether ``items`` are protobuf ``EmbedRequest``s, the items again): what decides between
    ``embed_stream``'s low-level and item forms."""
    first, items = peek(items)
    return isinstance(first, pb.EmbedRequest), items


def choose_modality(
    items: Any,
    modality: str | None,
    model: ModelInfo | None,
    served: Sequence[ModelInfo] | None,
) -> tuple[str, Any]:
    """The modality of an ``embed`` call, and the items again (the first may have been looked
    at): the one given; else the model's; else the only one the server serves; else what the
    first item is (arrays, PIL images, bytes and ``Path``s are images, RDKit ``Mol``s
    molecules). A ``str`` may be an image path or a SMILES: then the caller must say."""
    if modality is not None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'image' or 'molecule', got {modality!r}")
        if model is not None and model.modality not in (modality, "unspecified"):
            raise ValueError(f"model {model.name!r} embeds {model.modality}s, not {modality}s")
        return modality, items
    if model is not None and model.modality in MODALITIES:
        return model.modality, items
    kinds = sorted({m.modality for m in served or ()} & set(MODALITIES))
    if len(kinds) == 1 and model is None:
        return kinds[0], items
    first, items = peek(items)
    if isinstance(first, (np.ndarray, Image.Image, bytes, bytearray, memoryview, os.PathLike)):
        return "image", items
    if is_rdkit_mol(first):
        return "molecule", items
    what = "no items" if first is _NOTHING else f"items of type {type(first).__name__}"
    raise ValueError(
        f"cannot tell from {what} whether to embed images or molecules (a str may be an image "
        "path or a SMILES): pass modality='image' or modality='molecule', or model=..."
    )


def default_model(models: Sequence[ModelInfo], modality: str, target: str) -> str:
    """The name of the server's only model of ``modality``."""
    names = [m.name for m in models if m.modality == modality]
    if not names:
        raise ModelNotFoundError(
            f"the server at {target} serves no {modality} model", code=grpc.StatusCode.NOT_FOUND
        )
    if len(names) > 1:
        raise ValueError(
            f"the server serves several {modality} models ({', '.join(names)}); "
            "choose one with model=..."
        )
    return names[0]


class BaseClient:
    """The settings and caches of ``Client`` and ``AsyncClient`` (their docstrings say what
    each argument does); subclasses open the channel (``_open``) and make the calls."""

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
        tls: bool | None = None,
        tls_ca_file: str | os.PathLike[str] | None = None,
        tls_cert_file: str | os.PathLike[str] | None = None,
        tls_key_file: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        load_balancing: str | None = None,
        retries: int = 3,
        retry_backoff: float = 0.1,
        retry_backoff_max: float = 10.0,
        concurrency: int = 1,
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
        self.concurrency = _concurrency(concurrency)
        self.target, self.timeout, self.max_message_bytes = target, timeout, max_message_bytes
        address, scheme_tls = parse_target(target)
        files = tls_ca_file or tls_cert_file or tls_key_file
        if scheme_tls is False and (tls or files or credentials is not None):
            raise ValueError(f"target {target!r} is plain text (grpc://): use grpcs:// for TLS")
        if scheme_tls and tls is False:
            raise ValueError(f"target {target!r} is TLS (grpcs://) but tls=False")
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
        if credentials is None and (tls or scheme_tls or files):
            credentials = tls_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        self._channel = self._open(address, credentials, channel_options)
        self._models: dict[str, ModelInfo] = {}
        self._defaults: dict[str, str] = {}

    def _open(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _retry_delay(self, err: grpc.RpcError, attempt: int, offset: int) -> float:
        """How long to wait before sending a failed call again (exponential backoff with full
        jitter, at least the server's retry hint); raises the call's typed error when it is not
        to be retried: anything but UNAVAILABLE and RESOURCE_EXHAUSTED, or no retries left."""
        error = error_from_rpc(err, offset)
        if attempt >= self.retries or not isinstance(error, _RETRYABLE):
            raise error from err
        ceiling = min(self.retry_backoff_max, self.retry_backoff * 2**attempt)
        hint = error.retry_after or 0.0
        self.retried += 1
        return min(self.retry_backoff_max, max(hint, random.uniform(0, ceiling)))

    def _known(self, name: str | None, modality: str) -> str | None:
        """The model to use: ``name``, else the cached default of ``modality`` (None: list the
        models first, then ``_default``)."""
        return name if name is not None else self._defaults.get(modality)

    def _default(self, models: Sequence[ModelInfo], modality: str) -> str:
        self._defaults[modality] = default_model(models, modality, self.target)
        return self._defaults[modality]

    def _checked(self, info: ModelInfo, modality: str) -> ModelInfo:
        if info.modality not in (modality, "unspecified"):
            raise ValueError(f"model {info.name!r} embeds {info.modality}s, not {modality}s")
        return info

    def _forget(self, name: str) -> None:
        """The server no longer has ``name``: its models changed, so forget what was cached."""
        self._models.pop(name, None)
        self._defaults.clear()

    def _job(
        self,
        info: ModelInfo,
        modality: str,
        items: Any,
        projection: str | None,
        model_version: str | None,
        batch_size: int | None,
        progress: bool | None,
        standardize: bool | None = None,
    ) -> tuple[EmbedJob, Iterator[pb.Input]]:
        inputs = image_inputs(items) if modality == "image" else molecule_inputs(items)
        job = EmbedJob(
            info,
            projection,
            model_version,
            BATCH_SIZE[modality] if batch_size is None else batch_size,
            self.max_message_bytes - MESSAGE_SLACK,
            progress,
            len(items) if isinstance(items, Sized) and not isinstance(items, _SINGLE) else None,
            standardize,
        )
        return job, inputs

    def _workers(self, concurrency: int | None) -> int:
        return self.concurrency if concurrency is None else _concurrency(concurrency)


def _concurrency(value: int) -> int:
    if value < 1:
        raise ValueError(f"concurrency must be at least 1, got {value}")
    return value


class ModelPager:
    """``ListModels`` page by page: send ``request()`` until it is None, ``add`` each page."""

    def __init__(self) -> None:
        self.models: list[ModelInfo] = []
        self._token: str | None = ""
        self._seen: set[str] = set()

    def request(self) -> pb.ListModelsRequest | None:
        return None if self._token is None else pb.ListModelsRequest(page_token=self._token)

    def add(self, page: pb.ListModelsResponse) -> None:
        self.models += [ModelInfo.from_proto(m) for m in page.models]
        token = page.next_page_token
        done = not token or token in self._seen  # a repeated token would loop forever
        self._seen.add(token)
        self._token = None if done else token


class EmbedJob:
    """One embed call, whichever way its requests travel.

    1. ``requests(inputs)`` yields (index of the first item, item count, ``EmbedRequest``), each
       at most ``batch_size`` items (and the model's ``max_inputs_per_request``) and about
       ``max_bytes``; inputs are encoded only as requests are drawn, so memory stays bounded.
    2. ``answer(start, count, response)`` checks and decodes each response, in any order, and
       moves the progress bar; ``stream_answer`` does the same for an ``EmbedStream`` answer.
    3. ``arrays()`` / ``embeddings()`` give the rows in the caller's order; ``close()`` ends the
       progress bar.

    ``progress``: None shows a bar (tqdm, on stderr) when stderr is a terminal and the call
    takes more than one request; True always, False never. ``total`` (items) sizes the bar.
    ``standardize``: None or True, the model's standardisation of molecules applies; False, it
    does not (``EmbedRequest.standardization``).
    """

    def __init__(
        self,
        info: ModelInfo,
        projection: str | None,
        model_version: str | None,
        batch_size: int,
        max_bytes: int,
        progress: bool | None = None,
        total: int | None = None,
        standardize: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if standardize not in (None, True, False):
            raise ValueError(f"standardize must be None, True or False, got {standardize!r}")
        self.standardization = _STANDARDIZATION[standardize]
        limit = info.input_limits.max_inputs_per_request
        self.info, self.projection, self.model_version = info, projection, model_version
        self.per_request = min(batch_size, limit) if limit > 0 else batch_size
        self.max_bytes, self.progress, self.total = max_bytes, progress, total
        self.versions: set[str] = set()
        self.served_projection = ""
        self._parts: dict[int, tuple[np.ndarray, np.ndarray, Notes]] = {}
        self._done = 0
        self._bar: Any = None

    def requests(self, inputs: Iterable[pb.Input]) -> Iterator[tuple[int, int, pb.EmbedRequest]]:
        chunks = chunk_inputs(inputs, self.per_request, self.max_bytes)
        for number, (start, chunk) in enumerate(chunks):
            if number == (0 if self.progress else 1) and self.progress is not False:
                self._open_bar()
            request = pb.EmbedRequest(
                model=self.info.name,
                inputs=chunk,
                projection=self.projection or "",
                model_version=self.model_version or "",
                standardization=self.standardization,
            )
            yield start, len(chunk), request

    def _open_bar(self) -> None:
        if self.progress is None and not _is_terminal(sys.stderr):
            return
        try:
            from tqdm import tqdm
        except ImportError:  # an optional nicety
            return
        self._bar = tqdm(
            total=self.total,
            initial=self._done,
            desc=f"embedding ({self.info.name})",
            unit="item",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def answer(
        self, start: int, count: int, response: pb.EmbedResponse, keep: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        self.versions.add(response.model_version)
        if len(self.versions) > 1:
            raise QuotientError(
                f"model {self.info.name!r} changed version during this call "
                f"({', '.join(sorted(self.versions))}): its embeddings are not comparable; "
                "embed again, or pin model_version="
            )
        self.served_projection = self.served_projection or response.projection
        values, poses = decode_embeddings(response, count)
        if keep:
            self._parts[start] = values, poses, notes_from_proto(response)
        self._done += count
        if self._bar is not None:
            self._bar.update(count)
        return values, poses

    def stream_answer(self, start: int, count: int, answer: pb.EmbedStreamResponse) -> Embeddings:
        """One ``EmbedStream`` answer as ``Embeddings``; a failed request raises its error, its
        item indices the caller's."""
        if answer.HasField("error"):
            raise error_from_status(answer.error, offset=start)
        values, poses = self.answer(start, count, answer.response, keep=False)
        return Embeddings(values, self.spec(), poses, notes_from_proto(answer.response))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros((0, self.dimension()), np.float32), np.zeros(0, np.float64)
        parts = [self._parts[start] for start in sorted(self._parts)]
        return np.concatenate([v for v, _, _ in parts]), np.concatenate([p for _, p, _ in parts])

    def notes(self) -> Notes:
        """Each row's notes, in the caller's order."""
        return tuple(n for start in sorted(self._parts) for n in self._parts[start][2])

    def embeddings(self) -> Embeddings:
        values, poses = self.arrays()
        return Embeddings(values, self.spec(), poses, self.notes())

    def dimension(self) -> int:
        described = self.info.projection(self.served_projection or self.projection)
        return described.dimension if described is not None else 0

    def spec(self) -> EmbeddingSpec:
        """What these vectors are: the model, the version that answered (the description's
        when nothing was sent), the projection, its dimension and metric."""
        version = next(iter(self.versions), "") or self.model_version or None
        return self.info.spec(self.served_projection or self.projection, version)

    def check_poses(self) -> None:
        """``return_poses`` with a projection that computes none is a mistake: say so, rather
        than answer NaN."""
        described = self.info.projection(self.projection)
        if described is not None and not described.returns_pose:
            with_pose = [p.name for p in self.info.projections if p.returns_pose]
            raise ValueError(
                f"projection {described.name!r} of model {self.info.name!r} computes no pose; "
                + (f"projections with a pose: {', '.join(with_pose)}" if with_pose else "none has")
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed
        return False


def decode_embeddings(response: pb.EmbedResponse, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``EmbedResponse`` → (float32 [expected, D] values, float64 [expected] poses, NaN where
    none was computed)."""
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


@dataclass
class DecodeJob:
    """One decode call: ``requests()`` yields (index of the first row, ``DecodeRequest``);
    ``answer`` each response; ``molecules`` in order."""

    rows: list[np.ndarray]
    model: str
    per_request: int
    model_version: str | None = None
    allow_inexact: bool = False

    def __post_init__(self) -> None:
        self.molecules: list[DecodedMolecule] = []

    @classmethod
    def of(
        cls,
        embeddings: np.ndarray | Sequence[Sequence[float]],
        model: str,
        cached: ModelInfo | None,
        batch_size: int,
        model_version: str | None,
        allow_inexact: bool = False,
    ) -> DecodeJob:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = [np.asarray(row, np.float32).ravel() for row in embeddings]
        limit = cached.input_limits.max_inputs_per_request if cached is not None else 0
        per_request = min(batch_size, limit) if limit > 0 else batch_size
        return cls(rows, model, per_request, model_version, allow_inexact)

    def requests(self) -> Iterator[tuple[int, pb.DecodeRequest]]:
        for start in range(0, len(self.rows), self.per_request):
            chunk = self.rows[start : start + self.per_request]
            yield (
                start,
                pb.DecodeRequest(
                    model=self.model,
                    embeddings=[pb.Embedding(values=r.tolist()) for r in chunk],
                    model_version=self.model_version or "",
                    allow_inexact=self.allow_inexact,
                ),
            )

    def answer(self, request: pb.DecodeRequest, response: pb.DecodeResponse) -> None:
        if len(response.molecules) != len(request.embeddings):
            raise QuotientError(
                f"the server returned {len(response.molecules)} molecules for "
                f"{len(request.embeddings)} embeddings"
            )
        self.molecules += [
            DecodedMolecule(
                m.smiles or None,
                m.reason or None,
                m.distance if m.HasField("distance") else None,
            )
            for m in response.molecules
        ]
