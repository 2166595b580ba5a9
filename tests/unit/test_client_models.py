"""``ModelInfo.from_proto``: the distance and normalisation GetModel states for each projection."""

from __future__ import annotations

import pytest

from quotient_client import ModelInfo
from quotient_client._embeddings import METRICS
from quotient_client.proto import embedding_service_pb2 as pb


def _model(*projections: pb.Projection) -> pb.Model:
    return pb.Model(name="m", version="1", default_projection="a", projections=projections)


@pytest.mark.parametrize(
    ("metric", "name"),
    [
        (pb.DISTANCE_METRIC_COSINE, "cosine"),
        (pb.DISTANCE_METRIC_L2, "l2"),
        (pb.DISTANCE_METRIC_INNER_PRODUCT, "inner_product"),
        (pb.DISTANCE_METRIC_UNSPECIFIED, "l2"),  # a server older than the field
    ],
)
def test_metric_names(metric: int, name: str) -> None:
    info = ModelInfo.from_proto(_model(pb.Projection(name="a", dimension=2, metric=metric)))
    got = info.projection()
    assert got is not None and got.metric == name and not got.normalized


def test_every_named_metric_is_one_the_sdk_knows_and_normalized_is_kept() -> None:
    projections = [
        pb.Projection(name=str(v), dimension=1, metric=v, normalized=True)
        for v in pb.DistanceMetric.values()
    ]
    info = ModelInfo.from_proto(_model(*projections))
    assert {p.metric for p in info.projections} == set(METRICS)
    assert all(p.normalized for p in info.projections)
