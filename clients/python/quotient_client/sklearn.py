"""``QuotientEmbedder``: a scikit-learn transformer from images or molecules to embeddings.

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from quotient_client.sklearn import QuotientEmbedder

    pipe = Pipeline([("embed", QuotientEmbedder("127.0.0.1:50051")), ("clf", LogisticRegression())])
    pipe.fit(train_images, train_labels)
    pipe.predict(test_images)

Needs scikit-learn (``quotient-client[sklearn]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

try:
    from sklearn.base import BaseEstimator, TransformerMixin
    from sklearn.utils.validation import check_is_fitted
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "quotient_client.sklearn needs scikit-learn: pip install 'quotient-client[sklearn]'"
    ) from exc

from quotient_client._client import API_KEY_ENV, DEFAULT_TARGET, Client
from quotient_client._embeddings import Embeddings, EmbeddingSpec, SpecMismatchError
from quotient_client._errors import FailedPreconditionError, ModelNotFoundError
from quotient_client._models import ModelInfo

__all__ = ["QuotientEmbedder"]

_MODALITIES = ("image", "molecule")


class QuotientEmbedder(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Embeds each item of ``X`` with a Quotient server → float32 [n, dimension].

    1. ``QuotientEmbedder(target, model=..., projection=..., modality=...)`` stores its
       parameters as given and connects to nothing (scikit-learn's rule: ``get_params``,
       ``set_params`` and ``clone`` work on them).
    2. ``fit(X, y=None)`` asks the server for the model (``GetModel``; ``model`` None: the
       server's only model of ``modality``) and records what it serves in ``spec_`` (name,
       version, projection, dimension, metric) and ``model_version_``. ``X`` is not embedded.
    3. ``transform(X)`` embeds ``X`` pinned to ``model_version_``: a server that now serves
       another version is refused with ``SpecMismatchError``, so that a pipeline trained on one
       version never silently runs on another (their embeddings are not comparable). Refit to
       move to the new version.
    4. Pickling drops the connection (and ``api_key``: a pickled pipeline holds no secret); the
       first ``transform`` after unpickling connects again (the key then comes from
       ``QUOTIENT_API_KEY``, or ``set_params(api_key=...)``). ``close()`` closes it early.

    ``X`` is a list (or 1-D array, or one-column DataFrame/2-D array) of items: for
    ``modality="image"`` file paths, encoded bytes, numpy arrays or PIL images (a 3-D array
    [n, H, W] is n images); for ``"molecule"`` SMILES, MolBlock/SDF text or RDKit ``Mol``s.
    ``model_version`` (None: whatever the server serves at ``fit``) makes ``fit`` itself refuse
    another version. ``batch_size`` (None: the client's default), ``timeout`` (seconds per call)
    and ``client_options`` (more keyword arguments of ``Client``: TLS files, ``retries``, ...) go
    to the client. Bad items raise the client's errors (``InvalidInputError`` with the item's
    index, ``ValueError``) from ``transform``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        model: str | None = None,
        projection: str | None = None,
        modality: str = "image",
        model_version: str | None = None,
        api_key: str | None = None,
        batch_size: int | None = None,
        timeout: float | None = 30.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.target = target
        self.model = model
        self.projection = projection
        self.modality = modality
        self.model_version = model_version
        self.api_key = api_key
        self.batch_size = batch_size
        self.timeout = timeout
        self.client_options = client_options

    # ------------------------------------------------------------------ scikit-learn API
    def fit(self, X: Any = None, y: Any = None) -> QuotientEmbedder:
        """Record the served model's spec (see the class docstring); ``X`` and ``y`` are
        ignored. Raises ``ModelNotFoundError``, ``ValueError`` for an unknown projection or
        modality, ``SpecMismatchError`` when ``model_version`` is set and another is served."""
        if self.modality not in _MODALITIES:
            raise ValueError(
                f"modality must be one of {', '.join(_MODALITIES)}, got {self.modality!r}"
            )
        self.close()  # the parameters may have changed since the last connection
        info = self._describe(self._connect())
        spec = info.spec(self.projection)
        if self.model_version is not None and info.version != self.model_version:
            raise SpecMismatchError(
                f"model {info.name!r} is served at version {info.version}, not "
                f"{self.model_version!r} (model_version=)"
            )
        self.spec_ = spec
        self.model_version_ = info.version
        self.n_features_out_ = spec.dimension
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Embed each item of ``X`` → float32 [n, dimension] (see the class docstring)."""
        return self.embed(X).vectors

    def embed(self, X: Any) -> Embeddings:
        """Like ``transform``, with the spec (and poses): an ``Embeddings``."""
        check_is_fitted(self, "spec_")
        spec: EmbeddingSpec = self.spec_
        items = _items(X)
        client = self._connect()
        try:
            got = _embed(client, items, self.modality, spec, self.batch_size)
        except FailedPreconditionError as exc:
            if exc.reason != "MODEL_VERSION_MISMATCH":
                raise
            served = exc.metadata.get("served_version", "another version")
            raise SpecMismatchError(
                f"this embedder was fitted on {spec.label()}, but {self.target} now serves "
                f"{spec.model} {served}: embeddings of different versions are not comparable; "
                "refit the pipeline on the new version"
            ) from exc
        spec.check(got.spec, f"the embeddings {self.target} returned")
        return got

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``["<projection>0", "<projection>1", ...]``, one name per output value."""
        check_is_fitted(self, "spec_")
        return np.asarray(
            [f"{self.spec_.projection}{i}" for i in range(self.spec_.dimension)], dtype=object
        )

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array = True
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = self.modality == "molecule"
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ connection
    def close(self) -> None:
        """Close the connection, if any (the next ``transform`` opens a new one)."""
        client = self.__dict__.pop("_client", None)
        self.__dict__.pop("_client_key", None)
        if client is not None:
            client.close()

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        """scikit-learn's repr, with ``api_key`` masked (reprs end up in logs)."""
        key = self.api_key
        if not key:
            return str(super().__repr__(N_CHAR_MAX))
        self.api_key = "***"
        try:
            return str(super().__repr__(N_CHAR_MAX))
        finally:
            self.api_key = key

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_client", None)
        state.pop("_client_key", None)
        state["api_key"] = None
        return state

    def _connect(self) -> Client:
        """The client for the current parameters (a new one after ``set_params`` changed them, or
        ``QUOTIENT_API_KEY`` when ``api_key`` is None)."""
        api_key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        key = (self.target, self.timeout, api_key, repr(self.client_options))
        client: Client | None = self.__dict__.get("_client")
        if client is not None and self.__dict__.get("_client_key") != key:
            self.close()
            client = None
        if client is None:
            client = Client(
                self.target,
                timeout=self.timeout,
                api_key=api_key,
                **(self.client_options or {}),
            )
            self._client, self._client_key = client, key
        return client

    def _describe(self, client: Client) -> ModelInfo:
        if self.model is not None:
            info = client.get_model(self.model)
            if info.modality not in (self.modality, "unspecified"):
                raise ValueError(
                    f"model {info.name!r} embeds {info.modality}s, not {self.modality}s (modality=)"
                )
            return info
        models = [m for m in client.list_models() if m.modality == self.modality]
        if not models:
            raise ModelNotFoundError(f"{self.target} serves no {self.modality} model")
        if len(models) > 1:
            names = ", ".join(m.name for m in models)
            raise ValueError(
                f"{self.target} serves several {self.modality} models ({names}): choose model="
            )
        return models[0]


def _items(X: Any) -> list[Any]:
    """The items of ``X``: a one-column DataFrame or 2-D object/str array gives its column."""
    if hasattr(X, "iloc") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"X must have one column of items, got {X.shape[1]} columns")
        X = X.iloc[:, 0]
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype.kind in "OUS":
        if X.shape[1] != 1:
            raise ValueError(f"X must have one column of items, got {X.shape[1]} columns")
        X = X[:, 0]
    if isinstance(X, str | bytes) or not isinstance(X, Iterable):
        raise TypeError(f"X must be a sequence of items, got {type(X).__name__}")
    return [str(x) if isinstance(x, np.str_) else x for x in X]


def _embed(
    client: Client, items: list[Any], modality: str, spec: EmbeddingSpec, batch_size: int | None
) -> Embeddings:
    """``client.embed`` pinned to ``spec``'s model, projection and version."""
    return client.embed(
        items,
        modality=modality,
        model=spec.model,
        projection=spec.projection,
        model_version=spec.version,
        batch_size=batch_size,
    )
