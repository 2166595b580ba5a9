"""What Client and AsyncClient share (quotient_client._core): target names, modality choice,
and that ``concurrency`` really puts that many requests in flight and never more (against a
small real gRPC server, written here, that counts the calls it holds at once)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

import quotient_client as qc
from quotient_client._core import choose_modality, is_request_stream, parse_target
from quotient_client._models import ModelInfo
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc


@pytest.mark.parametrize(
    ("target", "address", "tls"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", None),
        ("dns:///quotient-headless.ns:50051", "dns:///quotient-headless.ns:50051", None),
        ("unix:/run/quotient.sock", "unix:/run/quotient.sock", None),
        ("grpc://example.com:9000", "example.com:9000", False),
        ("grpc://example.com", "example.com:50051", False),
        ("grpcs://example.com", "example.com:443", True),
        ("GRPCS://example.com:8443/", "example.com:8443", True),
        ("grpcs://[::1]:8443", "[::1]:8443", True),
    ],
)
def test_targets_by_name(target: str, address: str, tls: bool | None) -> None:
    assert parse_target(target) == (address, tls)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("https://example.com", "does not speak https"),
        ("grpcs://user:secret@example.com", "api_key="),
        ("grpc://example.com:1/path", "nothing more"),
        ("grpcs://", "nothing more"),
    ],
)
def test_targets_that_cannot_work_are_refused(target: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_target(target)


def _info(name: str, modality: str) -> ModelInfo:
    return ModelInfo.from_proto(
        pb.Model(
            name=name,
            modality=pb.MODALITY_IMAGE if modality == "image" else pb.MODALITY_MOLECULE,
            default_projection="p",
            projections=[pb.Projection(name="p", dimension=2, invariant=True)],
        )
    )


def test_the_modality_comes_from_what_is_known_first() -> None:
    image, molecule = _info("i", "image"), _info("m", "molecule")
    both = [image, molecule]
    assert choose_modality(["CCO"], "molecule", None, None)[0] == "molecule"
    assert choose_modality(["a.png"], None, image, None)[0] == "image"
    assert choose_modality(["CCO"], None, None, [molecule])[0] == "molecule"
    assert choose_modality([np.zeros((2, 2))], None, None, both)[0] == "image"
    assert choose_modality(Image.new("L", (2, 2)), None, None, both)[0] == "image"
    modality, items = choose_modality(iter([b"png", b"more"]), None, None, both)
    assert modality == "image" and list(items) == [b"png", b"more"]  # the peeked item is kept
    for ambiguous in (["CCO"], "CCO", [], iter([])):
        with pytest.raises(ValueError, match="pass modality='image' or modality='molecule'"):
            choose_modality(ambiguous, None, None, both)


def test_request_streams_are_told_from_items() -> None:
    request = pb.EmbedRequest(model="m")
    raw, items = is_request_stream(iter([request, request]))
    assert raw and list(items) == [request, request]
    assert not is_request_stream([np.zeros((2, 2))])[0]
    assert not is_request_stream(np.zeros((3, 2, 2)))[0]  # one item (refused later, clearly)


class Holding(pb_grpc.EmbeddingServiceServicer):
    """Holds every Embed call until ``together`` calls are in at once (or ``timeout`` seconds
    pass, then fails it); records the most calls it held at once."""

    def __init__(self, together: int, timeout: float = 5.0) -> None:
        self.barrier, self.timeout = threading.Barrier(together), timeout
        self.lock = threading.Lock()
        self.inside = self.most = 0

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        return pb.Model(
            name=request.name,
            version="1",
            modality=pb.MODALITY_IMAGE,
            default_projection="p",
            projections=[pb.Projection(name="p", dimension=1, invariant=True)],
        )

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            self.barrier.wait(timeout=self.timeout)
        except threading.BrokenBarrierError:
            context.abort(grpc.StatusCode.ABORTED, "fewer calls came at once than expected")
        finally:
            with self.lock:
                self.inside -= 1
        values = [pb.Embedding(values=[float(len(i.image.data))]) for i in request.inputs]
        return pb.EmbedResponse(embeddings=values, model_version="1", projection="p")


@pytest.fixture
def holding() -> Iterator[tuple[str, Holding]]:
    servicer = Holding(together=3)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_concurrency_puts_that_many_requests_in_flight(holding: tuple[str, Holding]) -> None:
    target, servicer = holding
    items = [b"x" * k for k in range(1, 13)]  # 12 requests of one item: 4 rounds of 3
    with qc.Client(target, retries=0) as client:
        vectors = client.embed_images(items, model="m", batch_size=1, concurrency=3)
    np.testing.assert_array_equal(vectors[:, 0], range(1, 13))  # in the caller's order
    assert servicer.most == 3


def test_async_concurrency_puts_that_many_requests_in_flight(
    holding: tuple[str, Holding],
) -> None:
    target, servicer = holding

    async def main() -> qc.Embeddings:
        async with qc.AsyncClient(target, retries=0, concurrency=3) as client:
            return await client.embed([b"x" * k for k in range(1, 13)], model="m", batch_size=1)

    embedded = asyncio.run(main())
    np.testing.assert_array_equal(embedded.vectors[:, 0], range(1, 13))
    assert servicer.most == 3 and embedded.spec.version == "1"


def test_too_little_concurrency_is_seen(holding: tuple[str, Holding]) -> None:
    target, servicer = holding  # the servicer's check itself: two at once never pass
    servicer.timeout = 0.5
    with qc.Client(target, retries=0) as client, pytest.raises(qc.QuotientError) as caught:
        client.embed_images([b"a", b"b"], model="m", batch_size=1, concurrency=2)
    assert caught.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        qc.Client(target, concurrency=0)
