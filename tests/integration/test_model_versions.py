"""Model versions through the public API: every Embed and Decode answer names the version that
made it, a request may pin one (FAILED_PRECONDITION when the server serves another), and the SDK
passes the pin and refuses a call whose parts came from different versions."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotient_client import Client, FailedPreconditionError, QuotientError
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

MOLECULE, IMAGE = "qm9-vae", "rotmnist-c8"


@pytest.fixture(scope="module")
def service(start_service):
    return start_service()


@pytest.fixture(scope="module")
def versions(service) -> dict[str, str]:
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(service.target))
    return {m.name: m.version for m in stub.ListModels(pb.ListModelsRequest()).models}


def embed_request(**fields) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        model=MOLECULE, inputs=[pb.Input(molecule=pb.Molecule(smiles="CCO"))], **fields
    )


def test_every_answer_names_its_model_version(service, versions, png, digits):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(service.target))
    assert versions[MOLECULE] and versions[IMAGE]
    answer = stub.Embed(embed_request(), timeout=30)
    assert answer.model_version == versions[MOLECULE]
    image = pb.EmbedRequest(model=IMAGE, inputs=[pb.Input(image=pb.Image(data=png(digits(0))))])
    assert stub.Embed(image, timeout=30).model_version == versions[IMAGE]
    streamed = list(stub.EmbedStream(iter([embed_request(request_id="s")]), timeout=30))
    assert streamed[0].response.model_version == versions[MOLECULE]
    decoded = stub.Decode(
        pb.DecodeRequest(model=MOLECULE, embeddings=answer.embeddings), timeout=30
    )
    assert decoded.model_version == versions[MOLECULE]


def test_a_pinned_version_is_served_or_refused(service, versions):
    stub = pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(service.target))
    served = versions[MOLECULE]
    assert stub.Embed(embed_request(model_version=served), timeout=30).model_version == served
    for call in (
        lambda: stub.Embed(embed_request(model_version="0.0.1"), timeout=30),
        lambda: stub.Decode(
            pb.DecodeRequest(
                model=MOLECULE, embeddings=[pb.Embedding(values=[0.0] * 72)], model_version="0.0.1"
            ),
            timeout=30,
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        status = rpc_status.from_call(caught.value)
        info = error_details_pb2.ErrorInfo()
        next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
        assert info.reason == "MODEL_VERSION_MISMATCH"
        assert info.metadata["served_version"] == served
        assert info.metadata["requested_version"] == "0.0.1"
        assert f"served at version {served}, not '0.0.1'" in caught.value.details()


def test_the_sdk_pins_versions(service, versions):
    served = versions[MOLECULE]
    with Client(service.target) as client:
        rows = client.embed_molecules(["CCO", "CCN"], model_version=served)
        assert rows.shape[0] == 2
        assert [d.smiles for d in client.decode(rows, model_version=served)]
        with pytest.raises(FailedPreconditionError, match="served at version"):
            client.embed_molecules(["CCO"], model_version="9.9.9")
        with pytest.raises(FailedPreconditionError, match="served at version"):
            client.decode(rows, model_version="9.9.9")


def test_the_sdk_refuses_a_call_answered_by_two_versions(start_service, tmp_path):
    """The server is replaced by one serving another version of the model between two requests
    of one call (batch_size 1): the call fails instead of mixing incomparable embeddings."""
    import json
    import shutil

    from conftest import free_port

    from quotient_models.spec import discover_models

    source = next(s for s in discover_models(service_store()) if s.name == MOLECULE).directory
    stores = []
    for version in ("1.0.0", "2.0.0"):
        target = tmp_path / version / MOLECULE
        shutil.copytree(source, target)
        spec = json.loads((target / "model.json").read_text())
        spec["version"] = version
        (target / "model.json").write_text(json.dumps(spec))
        stores.append(str(tmp_path / version))
    port = free_port()
    first = start_service(model_store=stores[0], port=port)
    with Client(first.target) as client:
        # the SDK reads the next molecule before it sends the current request: reading the third
        # swaps the server between the first request and the second
        swap = lambda: replace(first, stores[1], port, start_service)  # noqa: E731
        molecules = iter_switching(["CCO", "CCN", "CCC"], after=2, switch=swap)
        with pytest.raises(QuotientError, match="changed version during this call"):
            client.embed_molecules(molecules, batch_size=1)


def service_store():
    from quotient_service.config import Settings, resolve_repo_path

    return resolve_repo_path(Settings().model_store)


def iter_switching(items, after, switch):
    for k, item in enumerate(items):
        if k == after:
            switch()
        yield item


def replace(old, store, port, start_service):
    old.stop()
    start_service(model_store=store, port=port)
