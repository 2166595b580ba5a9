"""quotient_client against the real service (in-process, embedded backend, the tiny C4 model):
every input type gives the same vector, rotated inputs give the same invariant embedding, and
errors are typed with the caller's item index across the client's requests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import quotient_client as qc

INVARIANT = ["align", "maxfilter", "mean", "max"]


@pytest.fixture(scope="module")
def client(start_service: Callable[..., Any], tiny_model_store: Path) -> Iterator[qc.Client]:
    service = start_service(model_store=str(tiny_model_store), max_inputs_per_request=8)
    with qc.Client(service.target) as c:
        yield c


def test_health_and_model_description(client: qc.Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("quotient.v1.EmbeddingService") == "SERVING"
    (info,) = client.list_models()
    assert info.name == "tiny-c4" and info.modality == "image" and info.group.order == 4
    assert client.get_model("tiny-c4") == info
    assert {p.name for p in info.projections} >= {*INVARIANT, "raw"}
    assert info.input_limits.max_inputs_per_request == 8


def test_every_input_type_gives_the_same_vector(
    client: qc.Client,
    digits: Callable[[int], np.ndarray],
    png: Callable[[np.ndarray], bytes],
    tmp_path: Path,
) -> None:
    pixels = digits(3)
    path = tmp_path / "digit.png"
    path.write_bytes(png(pixels))
    items = [
        pixels,
        pixels[..., None],
        np.repeat(pixels[..., None], 3, axis=2),
        pixels.astype(np.float32) / 255.0,
        Image.fromarray(pixels),
        png(pixels),
        str(path),
        path,
    ]
    vectors = client.embed_images(items)
    assert vectors.shape == (len(items), client.get_model("tiny-c4").projection().dimension)
    np.testing.assert_allclose(
        vectors, np.broadcast_to(vectors[0], vectors.shape), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("projection", INVARIANT)
def test_rotated_inputs_give_the_same_invariant_embedding(
    client: qc.Client, digits: Callable[[int], np.ndarray], projection: str
) -> None:
    images = [np.rot90(digits(seed), k) for seed in range(3) for k in range(4)]
    embedded = client.embed(images, model="tiny-c4", projection=projection)
    vectors, poses = embedded.vectors, embedded.poses
    by_digit = vectors.reshape(3, 4, -1)
    np.testing.assert_allclose(
        by_digit, np.repeat(by_digit[:, :1], 4, axis=1), rtol=1e-5, atol=1e-5
    )
    if client.get_model("tiny-c4").projection(projection).returns_pose:
        turns = (poses.reshape(3, 4) - poses.reshape(3, 4)[:, :1]) % 360
        np.testing.assert_allclose(turns, np.tile([0, 90, 180, 270], (3, 1)))
    else:
        assert np.isnan(poses).all()
        with pytest.raises(ValueError, match="computes no pose"):
            client.embed_images(images, projection=projection, return_poses=True)


def test_raw_projection_is_not_invariant(
    client: qc.Client, digits: Callable[[int], np.ndarray]
) -> None:
    raw = client.embed_images([digits(0), np.rot90(digits(0))], projection="raw")
    assert not np.allclose(raw[0], raw[1], rtol=1e-3)


def test_chunking_does_not_change_the_vectors(
    client: qc.Client, digits: Callable[[int], np.ndarray]
) -> None:
    images = [digits(seed) for seed in range(19)]  # the server takes 8 per request
    together = client.embed_images(images)
    apart = np.concatenate([client.embed_images(image) for image in images])
    np.testing.assert_allclose(together, apart, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        client.embed_images(images, batch_size=3), together, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("bad", "batch_size"), [(0, 4), (6, 4), (17, 64), (18, 8)])
@pytest.mark.parametrize(
    ("data", "words"), [(b"junk", "not a decodable image"), (b"", "empty image data")]
)
def test_bad_item_error_names_the_callers_index(
    client: qc.Client,
    digits: Callable[[int], np.ndarray],
    bad: int,
    batch_size: int,
    data: bytes,
    words: str,
) -> None:
    items: list[Any] = [digits(seed) for seed in range(19)]
    items[bad] = data
    with pytest.raises(qc.InvalidInputError) as info:
        client.embed_images(items, batch_size=batch_size)
    err = info.value
    assert err.index == bad and err.reason == "INVALID_INPUT"
    assert err.field is not None and err.field.startswith(f"inputs[{bad}]")
    assert err.message.startswith(f"input {bad}: {words}")


def test_request_errors_are_typed(client: qc.Client, digits: Callable[[int], np.ndarray]) -> None:
    with pytest.raises(qc.ModelNotFoundError):
        client.embed_images(digits(0), model="no-such-model")
    with pytest.raises(qc.InvalidInputError) as info:
        client.embed_images(digits(0), projection="no-such-projection")
    assert info.value.index is None
    with pytest.raises(ValueError, match="input 1: float image"):
        client.embed_images([digits(0), np.full((28, 28), 2.0)])
