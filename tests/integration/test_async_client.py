"""``AsyncClient`` (grpc.aio) against the real service: the same surface and answers as
``Client``, its errors typed with the caller's item index, retries, bounded concurrency and
``embed_stream``."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from conftest import digit, encode_png

import quotient_client as qc
from quotient_client.proto import embedding_service_pb2 as pb

IMAGE, MOLECULE = "rotmnist-c8", "qm9-vae"
SMILES = ["CCO", "OC1CC1", "C#N"]
T = TypeVar("T")


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any]) -> Any:
    return start_service()


def run(main: Callable[[qc.AsyncClient], Coroutine[Any, Any, T]], target: str, **kw: Any) -> T:
    async def session() -> T:
        async with qc.AsyncClient(target, **kw) as client:
            return await main(client)

    return asyncio.run(session())


def test_the_surface_answers_as_the_sync_client(service: Any) -> None:
    images = [digit(seed) for seed in range(5)]

    async def main(client: qc.AsyncClient) -> dict[str, Any]:
        await client.wait_for_serving(timeout=10)
        return {
            "health": await client.health(),
            "models": [m.name for m in await client.list_models()],
            "info": await client.get_model(IMAGE),
            "embedded": await client.embed(images, concurrency=2, batch_size=2),
            "images": await client.embed_images(images),
            "poses": await client.embed_images(images[:2], projection="align", return_poses=True),
            "molecules": await client.embed_molecules(SMILES),
            "decoded": await client.decode(await client.embed_molecules(SMILES)),
        }

    got = run(main, service.target)
    with qc.Client(service.target) as sync:
        assert got["health"] == sync.health() == "SERVING"
        assert got["models"] == [m.name for m in sync.list_models()] == [MOLECULE, IMAGE]
        assert got["info"] == sync.get_model(IMAGE)
        expected = sync.embed(images)
        assert got["embedded"].spec == expected.spec
        np.testing.assert_array_equal(got["embedded"].vectors, expected.vectors)
        np.testing.assert_array_equal(got["images"], expected.vectors)
        vectors, poses = sync.embed_images(images[:2], projection="align", return_poses=True)
        np.testing.assert_array_equal(got["poses"][0], vectors)
        np.testing.assert_array_equal(got["poses"][1], poses)
        np.testing.assert_array_equal(got["molecules"], sync.embed_molecules(SMILES))
        assert got["decoded"] == sync.decode(sync.embed_molecules(SMILES))


def test_errors_are_typed_and_concurrency_stops_at_the_first(service: Any) -> None:
    good = encode_png(digit(2))
    drawn = itertools.count()

    def endless() -> Iterator[bytes]:
        for item in itertools.chain([good] * 7, [b"junk"], itertools.repeat(good)):
            next(drawn)
            yield item

    async def main(client: qc.AsyncClient) -> None:
        with pytest.raises(qc.InvalidInputError) as caught:
            await client.embed_images(endless(), batch_size=2, concurrency=3)
        assert caught.value.index == 7
        assert next(drawn) <= 8 + 2 * (3 + 1)
        with pytest.raises(qc.ModelNotFoundError):
            await client.get_model("no-such-model")
        with pytest.raises(ValueError, match="computes no pose"):
            await client.embed_images([good], return_poses=True)
        with pytest.raises(qc.FailedPreconditionError) as pinned:
            await client.embed_images([good], model_version="0.0.0-nope")
        assert pinned.value.reason == "MODEL_VERSION_MISMATCH"

    run(main, service.target)


def test_embed_stream_items_and_requests(service: Any) -> None:
    images = [digit(seed) for seed in range(5)]

    async def main(client: qc.AsyncClient) -> tuple[list[Any], list[Any], list[int]]:
        chunks = [c async for c in client.embed_stream(images, batch_size=2)]
        raw = [pb.EmbedRequest(model=IMAGE, inputs=[pb.Input(image=pb.Image(data=b"junk"))])]
        answers = [a async for a in client.embed_stream(raw)]
        answered: list[int] = []
        with pytest.raises(qc.InvalidInputError) as caught:
            async for chunk in client.embed_stream([*images[:3], b"junk"], batch_size=2):
                answered.append(len(chunk))
        assert caught.value.index == 3
        with pytest.raises(TypeError, match="input 2: cannot embed a float"):
            async for chunk in client.embed_stream([*images[:2], 3.5], batch_size=2):
                answered.append(len(chunk))
        return chunks, answers, answered

    chunks, answers, answered = run(main, service.target)
    assert [len(c) for c in chunks] == [2, 2, 1]
    with qc.Client(service.target) as sync:
        np.testing.assert_allclose(
            np.concatenate([c.vectors for c in chunks]), sync.embed_images(images), atol=1e-6
        )
    (answer,) = answers
    assert qc.error_from_status(answer.error).code == grpc.StatusCode.INVALID_ARGUMENT
    assert answered == [2, 2]  # before the junk (a whole request fails), before the float


def test_it_is_made_inside_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        qc.AsyncClient("127.0.0.1:50051")


def test_an_unreachable_server_is_retried_then_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main(client: qc.AsyncClient) -> int:
        with pytest.raises(qc.ServiceUnavailableError):
            await client.list_models()
        with pytest.raises(qc.DeadlineExceededError, match="not SERVING after"):
            await client.wait_for_serving(timeout=0.3)
        return client.retried

    assert run(main, f"grpc://127.0.0.1:{port}", timeout=2, retries=2, retry_backoff=0.01) == 2
