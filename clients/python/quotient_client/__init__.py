"""Quotient Python SDK: invariant embeddings of images (and, next, molecules) over gRPC.

    from quotient_client import Client
    with Client("127.0.0.1:50051") as client:
        vectors = client.embed_images(["digit.png"])   # float32 [1, D]

Needs grpcio, protobuf, numpy and Pillow; not torch. See clients/python/README.md.
"""

from importlib.metadata import PackageNotFoundError, version

from quotient_client._aio import AsyncClient
from quotient_client._client import (
    API_KEY_ENV,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    Client,
    tls_credentials,
)
from quotient_client._embeddings import METRICS, Embeddings, EmbeddingSpec, SpecMismatchError
from quotient_client._errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    QuotientError,
    ServerBusyError,
    ServiceUnavailableError,
    UnauthenticatedError,
    error_from_status,
)
from quotient_client._inputs import ImageLike, encode_image
from quotient_client._models import (
    DecodedMolecule,
    InputLimits,
    MetricInfo,
    ModelInfo,
    ProjectionInfo,
    StandardizationStep,
    SymmetryGroup,
)
from quotient_client._notes import AtomChange, InputNote

try:
    __version__ = version("quotient-client")
except PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "METRICS",
    "AsyncClient",
    "AtomChange",
    "Client",
    "DeadlineExceededError",
    "DecodedMolecule",
    "EmbeddingSpec",
    "Embeddings",
    "FailedPreconditionError",
    "ImageLike",
    "InputLimits",
    "InputNote",
    "InvalidInputError",
    "MetricInfo",
    "ModelInfo",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ProjectionInfo",
    "QuotientError",
    "ServerBusyError",
    "ServiceUnavailableError",
    "SpecMismatchError",
    "StandardizationStep",
    "SymmetryGroup",
    "UnauthenticatedError",
    "encode_image",
    "error_from_status",
    "tls_credentials",
]
