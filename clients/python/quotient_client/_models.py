"""Plain-Python descriptions of served models (``ModelInfo``), decoded from quotient.v1.Model."""

from __future__ import annotations

from dataclasses import dataclass, field

from quotient_client._embeddings import EmbeddingSpec
from quotient_client.proto import embedding_service_pb2 as pb

__all__ = [
    "DecodedMolecule",
    "InputLimits",
    "MetricInfo",
    "ModelInfo",
    "ProjectionInfo",
    "StandardizationStep",
    "SymmetryGroup",
]

_MODALITIES = {pb.MODALITY_IMAGE: "image", pb.MODALITY_MOLECULE: "molecule"}
# quotient.v1.DistanceMetric → the names of _embeddings.METRICS; a server that states none
# (older than the field) means L2
_METRICS = {
    pb.DISTANCE_METRIC_UNSPECIFIED: "l2",
    pb.DISTANCE_METRIC_COSINE: "cosine",
    pb.DISTANCE_METRIC_L2: "l2",
    pb.DISTANCE_METRIC_INNER_PRODUCT: "inner_product",
}


@dataclass(frozen=True)
class DecodedMolecule:
    """What one embedding decodes to: ``smiles`` (canonical, non-isomeric) when the decoded graph
    is a valid molecule that embeds back to the embedding, else None and ``reason`` says why.
    ``distance``: how far the decoded molecule's own embedding is from the one decoded (L2, atom
    rows paired; float noise, about 1e-6, for an exact decode), None when no molecule was
    decoded. One beyond the model's tolerance is refused unless ``decode(...,
    allow_inexact=True)``."""

    smiles: str | None
    reason: str | None = None
    distance: float | None = None


@dataclass(frozen=True)
class ProjectionInfo:
    """One projection of a model's latent: ``dimension`` values per embedding; ``invariant`` is
    False only for analysis projections such as "raw"; ``returns_pose`` when poses are computed;
    ``metric`` the distance to search and cluster its embeddings with ("cosine", "l2" or
    "inner_product", chosen by the model card's neighbour figures); ``normalized`` whether the
    server returns them with unit L2 norm."""

    name: str
    dimension: int
    invariant: bool
    description: str = ""
    returns_pose: bool = False
    metric: str = "l2"
    normalized: bool = False


@dataclass(frozen=True)
class SymmetryGroup:
    """The group the invariant projections are invariant to (``order`` 0: depends on the input)."""

    name: str
    description: str = ""
    order: int = 0


@dataclass(frozen=True)
class StandardizationStep:
    """One step of a molecule model's standardisation of its inputs: ``name`` as in its
    model.json ("largest_fragment", "neutralize", "strip_isotopes") and what it does."""

    name: str
    description: str = ""


@dataclass(frozen=True)
class InputLimits:
    """What one request may contain; 0 or empty means the server states no limit.
    ``standardization``: the steps a molecule model applies to every input, in order (empty:
    none, molecules are embedded as sent); ``formal_charges`` and ``max_hydrogens``: the rest of a
    molecule model's domain (with ``max_atoms`` and ``elements``)."""

    max_inputs_per_request: int = 0
    max_input_bytes: int = 0
    max_pixels: int = 0
    image_formats: tuple[str, ...] = ()
    model_input_size: int = 0
    max_atoms: int = 0
    elements: tuple[str, ...] = ()
    standardization: tuple[StandardizationStep, ...] = ()
    formal_charges: tuple[int, ...] = ()
    max_hydrogens: int = 0


@dataclass(frozen=True)
class MetricInfo:
    """One figure of a model card (its metrics.json): the ``value``, what it measures
    (``description``) and the ``command`` that measured it."""

    name: str
    value: float
    description: str = ""
    command: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A served model: ``modality`` is "image", "molecule" or "unspecified"; ``metrics`` maps each
    model-card figure's name to its value (the keys: clients/python/README.md, "Model metrics"),
    ``metric_info`` the same names to their ``MetricInfo`` (description and command);
    ``model_card`` is Markdown."""

    name: str
    version: str
    modality: str
    group: SymmetryGroup
    projections: list[ProjectionInfo]
    default_projection: str
    input_limits: InputLimits
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    model_card: str = ""
    metric_info: dict[str, MetricInfo] = field(default_factory=dict)

    def projection(self, name: str | None = None) -> ProjectionInfo | None:
        """The projection called ``name`` (the default one when None), or None if unknown."""
        wanted = name or self.default_projection
        return next((p for p in self.projections if p.name == wanted), None)

    def spec(self, projection: str | None = None, version: str | None = None) -> EmbeddingSpec:
        """The ``EmbeddingSpec`` of this model's ``projection`` (the default when None) at
        ``version`` (the described one when None); ``ValueError`` for an unknown projection."""
        described = self.projection(projection)
        if described is None:
            known = ", ".join(p.name for p in self.projections)
            raise ValueError(
                f"model {self.name!r} has no projection "
                f"{projection or self.default_projection!r} (it has {known})"
            )
        return EmbeddingSpec(
            model=self.name,
            version=version or self.version,
            projection=described.name,
            dimension=described.dimension,
            metric=described.metric,  # GetModel's; "l2" from a server that states none
            normalized=described.normalized,
        )

    @classmethod
    def from_proto(cls, model: pb.Model) -> ModelInfo:
        """Decode a ``quotient.v1.Model`` message."""
        lim = model.input_limits
        return cls(
            name=model.name,
            version=model.version,
            modality=_MODALITIES.get(model.modality, "unspecified"),
            group=SymmetryGroup(model.group.name, model.group.description, model.group.order),
            projections=[
                ProjectionInfo(
                    p.name,
                    p.dimension,
                    p.invariant,
                    p.description,
                    p.returns_pose,
                    _METRICS.get(p.metric, "l2"),
                    p.normalized,
                )
                for p in model.projections
            ],
            default_projection=model.default_projection,
            input_limits=InputLimits(
                lim.max_inputs_per_request,
                lim.max_input_bytes,
                lim.max_pixels,
                tuple(lim.image_formats),
                lim.model_input_size,
                lim.max_atoms,
                tuple(lim.elements),
                tuple(StandardizationStep(s.name, s.description) for s in lim.standardization),
                tuple(lim.formal_charges),
                lim.max_hydrogens,
            ),
            description=model.description,
            metrics={m.name: m.value for m in model.metrics},
            model_card=model.model_card,
            metric_info={
                m.name: MetricInfo(m.name, m.value, m.description, m.command) for m in model.metrics
            },
        )
