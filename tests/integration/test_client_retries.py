"""The SDK's retries against a real server: RESOURCE_EXHAUSTED (admission control) and
UNAVAILABLE are retried with backoff, at least the server's RetryInfo delay; a bad request never
is."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import encode_png

from quotient_client import (
    Client,
    InvalidInputError,
    ServerBusyError,
    ServiceUnavailableError,
)
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

IMAGE = "rotmnist-c8"


@pytest.fixture(scope="module")
def busy_service(start_service):
    """Room for 64 items in flight; ``hold()`` occupies 48 of them for a few seconds."""
    service = start_service(max_inflight_items=64, max_request_pixels=1 << 34)
    black = encode_png(np.zeros((4096, 4096), dtype=np.uint8))
    request = pb.EmbedRequest(model=IMAGE, inputs=[pb.Input(image=pb.Image(data=black))] * 48)
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(service.target))

    def hold(pool: ThreadPoolExecutor):
        future = pool.submit(stub.Embed, request, timeout=120)
        end = time.monotonic() + 30
        gauge = service.app.metrics.registry.get_sample_value
        while (gauge("quotient_inflight_items") or 0) < 48:  # admitted: its items in flight
            assert time.monotonic() < end and not future.done()
            time.sleep(0.01)
        return future

    service.hold = hold
    return service


def test_overload_is_retried_until_it_passes(busy_service, png, digits):
    small = [png(digits(k)) for k in range(20)]  # 48 + 20 > 64 while the large call runs
    with ThreadPoolExecutor(1) as pool, Client(busy_service.target) as plain:
        plain.retries = 0
        large = busy_service.hold(pool)
        with pytest.raises(ServerBusyError) as caught:
            plain.embed_images(small, model=IMAGE)
        assert caught.value.reason == "INFLIGHT_LIMIT" and 0 < caught.value.retry_after <= 10
        with Client(busy_service.target, retries=100, retry_backoff=0.05) as client:
            rows = client.embed_images(small, model=IMAGE)  # retried until the large call ends
            assert rows.shape[0] == 20 and client.retried >= 1
            assert large.done()
        print(f"\nretried {client.retried} times while a large call held the server")


def test_a_bad_request_is_never_retried(busy_service):
    with Client(busy_service.target, retries=5) as client:
        with pytest.raises(InvalidInputError):
            client.embed_images([b"not an image"], model=IMAGE)
        assert client.retried == 0


def test_an_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=2, retries=2, retry_backoff=0.01) as client:
        with pytest.raises(ServiceUnavailableError):
            client.list_models()
        assert client.retried == 2


def test_a_server_that_comes_up_is_reached(start_service, pick_port):
    """Started while the client is already retrying: the call succeeds."""
    port = pick_port()
    starter = threading.Timer(1.0, lambda: start_service(port=port))
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=30, retry_backoff=0.2) as client:
            assert {m.name for m in client.list_models()} >= {IMAGE}
            assert client.retried >= 1
    finally:
        starter.join()


def test_retry_settings_are_checked():
    with pytest.raises(ValueError, match="retries"):
        Client(retries=-1)
    with pytest.raises(ValueError, match="retry_backoff_max"):
        Client(retry_backoff=2.0, retry_backoff_max=1.0)
