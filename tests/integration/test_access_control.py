"""Access control through real servers and real handshakes: API keys (missing, malformed, wrong,
right, rotated without a restart, never logged), TLS and mutual TLS with certificates made by
openssl for the session (``pki``), and the Python client's ``api_key=`` and TLS options.

The matrix (each row a test below):

| server          | client                                  | expected                   |
|-----------------|-----------------------------------------|----------------------------|
| API keys        | no key / malformed / wrong key          | UNAUTHENTICATED, reason    |
| API keys        | right key (metadata, api_key=, env)     | OK                         |
| API keys        | health without a key                    | SERVING                    |
| API keys        | reflection without a key                | UNAUTHENTICATED            |
| TLS             | plaintext                               | UNAVAILABLE (no handshake) |
| TLS             | trusts another CA                       | UNAVAILABLE (no handshake) |
| TLS             | trusts the CA                           | OK                         |
| mutual TLS      | no client certificate                   | UNAVAILABLE (refused)      |
| mutual TLS      | certificate of another CA               | UNAVAILABLE (refused)      |
| mutual TLS      | certificate of the CA                   | OK                         |
| mutual TLS+keys | valid certificate, no key / right key   | UNAUTHENTICATED / OK       |
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from quotient_client import Client, UnauthenticatedError
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_service.auth import ApiKeys
from quotient_service.errors import StartupError
from quotient_service.servicer import SERVICE_NAME

KEY, OTHER_KEY, NEW_KEY = "qk-test-7f3a9c", "qk-other-1b2d4e", "qk-rotated-55aa01"


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# accepted keys\n{KEY}\n\n{OTHER_KEY}\n")
    return path


@pytest.fixture(scope="module")
def keyed(start_service, tiny_model_store, key_file, pick_port):
    return start_service(
        model_store=str(tiny_model_store), api_key_file=str(key_file), metrics_port=pick_port()
    )


def list_models(target: str, metadata=None, credentials=None) -> pb.ListModelsResponse:
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        return stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (None, "API_KEY_MISSING"),
        ((("authorization", KEY),), "API_KEY_MALFORMED"),
        ((("authorization", "Basic abc"),), "API_KEY_MALFORMED"),
        ((("authorization", "Bearer "),), "API_KEY_MALFORMED"),
        ((("authorization", "Bearer not-a-key"),), "API_KEY_INVALID"),
        ((("authorization", f"Bearer {KEY}x"),), "API_KEY_INVALID"),
    ],
)
def test_a_call_without_an_accepted_key_is_unauthenticated(keyed, metadata, reason):
    with pytest.raises(grpc.RpcError) as caught:
        list_models(keyed.target, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(caught.value) == reason
    assert "Bearer" in caught.value.details() or "not accepted" in caught.value.details()


def test_every_listed_key_is_accepted(keyed):
    for key in (KEY, OTHER_KEY, f"  {KEY}  "):
        reply = list_models(keyed.target, (("authorization", f"Bearer {key}"),))
        assert [m.name for m in reply.models] == ["tiny-c4"]


def test_a_stream_without_a_key_is_refused(keyed, png, digits):
    with grpc.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedRequest(model="tiny-c4", inputs=[pb.Input(image=pb.Image(data=b"x"))])
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.EmbedStream(iter([request]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key_and_reflection_does(keyed):
    with grpc.insecure_channel(keyed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(reflect.ServerReflectionInfo(iter([ask]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = reflect.ServerReflectionInfo(
            iter([ask]), timeout=10, metadata=(("authorization", f"Bearer {KEY}"),)
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert SERVICE_NAME in names


def test_refusals_are_counted_in_the_metrics(keyed):
    with pytest.raises(grpc.RpcError):
        list_models(keyed.target, (("authorization", "Bearer wrong"),))
    port = keyed.app.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'quotient_auth_failures_total{method="ListModels",reason="API_KEY_INVALID"}' in text


def test_the_python_client_sends_its_api_key(keyed, monkeypatch, png, digits):
    with Client(keyed.target, api_key=KEY) as client:
        assert client.embed_images([png(digits(1))]).shape[0] == 1
    monkeypatch.setenv("QUOTIENT_API_KEY", OTHER_KEY)
    with Client(keyed.target) as client:
        assert [m.name for m in client.list_models()] == ["tiny-c4"]
    monkeypatch.delenv("QUOTIENT_API_KEY")
    with Client(keyed.target) as client, pytest.raises(UnauthenticatedError) as caught:
        client.list_models()
    assert caught.value.reason == "API_KEY_MISSING"
    with Client(keyed.target, api_key="wrong") as client, pytest.raises(UnauthenticatedError):
        client.list_models()


def test_keys_rotate_without_a_restart_and_are_never_logged(
    start_service, tiny_model_store, tmp_path, caplog
):
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    caplog.set_level(logging.DEBUG)
    service = start_service(model_store=str(tiny_model_store), api_key_file=str(path))
    bearer = lambda k: (("authorization", f"Bearer {k}"),)  # noqa: E731
    list_models(service.target, bearer(KEY))
    path.write_text(f"# rotated\n{NEW_KEY}\n")
    deadline = time.monotonic() + 10
    while True:  # the file is checked at most once a second
        try:
            list_models(service.target, bearer(NEW_KEY))
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the new key was not picked up"
            time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as caught:
        list_models(service.target, bearer(KEY))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    path.unlink()  # a rotation in progress: keep the keys read last
    time.sleep(1.2)
    list_models(service.target, bearer(NEW_KEY))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "API keys reloaded" in logged
    assert KEY not in logged and NEW_KEY not in logged and "keeping its old keys" in logged


def test_a_key_file_that_is_missing_or_empty_stops_the_start(tmp_path):
    with pytest.raises(StartupError, match="--api-key-file / QUOTIENT_API_KEY_FILE"):
        ApiKeys(tmp_path / "absent")
    (tmp_path / "empty").write_text("# no keys yet\n\n")
    with pytest.raises(StartupError, match="holds no key"):
        ApiKeys(tmp_path / "empty")


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(start_service, tiny_model_store, pki):
    return start_service(
        model_store=str(tiny_model_store), tls_cert_file=pki.server_pem, tls_key_file=pki.server_key
    )


@pytest.fixture(scope="module")
def mtls(start_service, tiny_model_store, pki, key_file):
    return start_service(
        model_store=str(tiny_model_store),
        tls_cert_file=pki.server_pem,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_pem,
    )


@pytest.fixture(scope="module")
def mtls_keyed(start_service, tiny_model_store, pki, key_file):
    return start_service(
        model_store=str(tiny_model_store),
        tls_cert_file=pki.server_pem,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_pem,
        api_key_file=str(key_file),
    )


def creds(pki, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    key = chain = None
    if client:
        key = read(getattr(pki, f"{client.replace('-', '_')}_key"))
        chain = read(getattr(pki, f"{client.replace('-', '_')}_pem"))
    root = read(getattr(pki, f"{ca.replace('-', '_')}_pem"))
    return grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=chain)


def test_tls_serves_clients_that_trust_its_ca(tls, pki):
    port = tls.port
    for target in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert [m.name for m in list_models(target, credentials=creds(pki)).models] == ["tiny-c4"]


@pytest.mark.parametrize("client", ["plaintext", "other CA"])
def test_tls_refuses_clients_without_a_verified_handshake(tls, pki, client):
    with pytest.raises(grpc.RpcError) as caught:
        if client == "plaintext":
            list_models(tls.target)
        else:
            list_models(f"localhost:{tls.port}", credentials=creds(pki, ca="rogue-ca"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", [None, "rogue-client"])
def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(mtls, pki, client):
    with pytest.raises(grpc.RpcError) as caught:
        list_models(f"localhost:{mtls.port}", credentials=creds(pki, client=client))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_certificate_of_its_ca(mtls, pki):
    reply = list_models(f"localhost:{mtls.port}", credentials=creds(pki, client="client"))
    assert [m.name for m in reply.models] == ["tiny-c4"]


def test_mutual_tls_and_api_keys_together(mtls_keyed, pki):
    target, good = f"localhost:{mtls_keyed.port}", creds(pki, client="client")
    with pytest.raises(grpc.RpcError) as caught:
        list_models(target, credentials=good)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = list_models(target, (("authorization", f"Bearer {KEY}"),), credentials=good)
    assert len(reply.models) == 1


def test_the_python_client_takes_tls_options_by_name(mtls_keyed, pki, png, digits):
    with Client(
        f"127.0.0.1:{mtls_keyed.port}",
        api_key=KEY,
        tls_ca_file=pki.ca_pem,
        tls_cert_file=pki.client_pem,
        tls_key_file=pki.client_key,
    ) as client:
        assert client.embed_images([png(digits(2))]).shape[0] == 1
        assert client.health() == "SERVING"
    with pytest.raises(ValueError, match="go together"):
        Client(f"127.0.0.1:{mtls_keyed.port}", tls_cert_file=pki.client_pem)
    with pytest.raises(ValueError, match="cannot read"):
        Client(f"127.0.0.1:{mtls_keyed.port}", tls_ca_file="/nonexistent/ca.pem")


def test_tls_settings_that_cannot_work_are_refused(tiny_model_store, tmp_path, pki):
    from quotient_service.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="go together"):
        Settings(tls_cert_file=pki.server_pem)
    with pytest.raises(ConfigError, match="mutual TLS needs"):
        Settings(tls_client_ca_file=pki.ca_pem)
    from quotient_service.auth import server_credentials

    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(StartupError, match=r"--tls-cert-file / QUOTIENT_TLS_CERT_FILE.*not PEM"):
        server_credentials(str(tmp_path / "not.pem"), pki.server_key)
    with pytest.raises(StartupError, match=r"--tls-key-file / QUOTIENT_TLS_KEY_FILE.*cannot read"):
        server_credentials(pki.server_pem, str(tmp_path / "absent.key"))


def test_the_health_port_serves_health_only_in_plaintext(
    start_service, tiny_model_store, pki, pick_port
):
    """A TLS-only server with --health-port: plaintext probes (Kubernetes, quotient-probe) get
    its health there, and nothing else is served on that port."""
    import subprocess
    import sys

    health_port = pick_port()
    service = start_service(
        model_store=str(tiny_model_store),
        tls_cert_file=pki.server_pem,
        tls_key_file=pki.server_key,
        health_port=health_port,
    )
    target = f"127.0.0.1:{health_port}"
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        list_models(target)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    probe = Path(sys.executable).parent / "quotient-probe"
    ok = subprocess.run([str(probe), "--target", target], capture_output=True, text=True)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    refused = subprocess.run(  # plaintext on the TLS port: no handshake, not SERVING
        [str(probe), "--target", service.target], capture_output=True, text=True
    )
    assert refused.returncode == 1
