"""The SDK's ergonomics against the real service (both served models): ``Client.embed`` and its
spec, modality inference, bounded concurrency (order, a bounded window, the first error
stopping the rest), progress bars, ``embed_stream`` over plain items, and ``grpc://`` /
``grpcs://`` targets, and the documented model metrics."""

from __future__ import annotations

import io
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import digit, encode_png

import quotient_client as qc
from quotient_client.proto import embedding_service_pb2 as pb

IMAGE, MOLECULE = "rotmnist-c8", "qm9-vae"
SMILES = ["CCO", "OC1CC1", "C#N", "CC(=O)O", "c1ccoc1"]


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any]) -> Any:
    return start_service()


@pytest.fixture(scope="module")
def client(service: Any) -> Iterator[qc.Client]:
    with qc.Client(service.target) as c:
        yield c


def digits(n: int) -> list[np.ndarray]:
    return [digit(seed) for seed in range(n)]


def test_embed_returns_vectors_with_their_spec(client: qc.Client) -> None:
    info = client.get_model(IMAGE)
    images = digits(5)
    embedded = client.embed(images)  # ndarrays: images, the server's only image model
    spec = embedded.spec
    assert (spec.model, spec.version, spec.projection) == (IMAGE, info.version, "maxfilter")
    assert spec.dimension == info.projection().dimension == embedded.vectors.shape[1]
    described = info.projection()
    assert (spec.metric, spec.normalized) == (described.metric, described.normalized)
    np.testing.assert_array_equal(embedded.vectors, client.embed_images(images))
    assert np.isnan(embedded.poses).all()  # maxfilter computes no pose

    aligned = client.embed([images[0], np.rot90(images[0])], projection="align")
    assert aligned.spec.projection == "align" and aligned.spec.dimension == 256
    # A pose is the rotation from the model's canonical orientation: only differences mean
    # something, and np.rot90 turns the digit by 90 degrees.
    np.testing.assert_allclose((aligned.poses[1] - aligned.poses[0]) % 360, 90, atol=1e-3)

    molecules = client.embed(SMILES, modality="molecule")
    assert molecules.spec.model == MOLECULE and len(molecules) == len(SMILES)
    np.testing.assert_array_equal(molecules.vectors, client.embed_molecules(SMILES))
    assert client.embed(SMILES, model=MOLECULE).spec == molecules.spec


def test_embed_infers_the_modality_only_where_it_is_unambiguous(client: qc.Client) -> None:
    with pytest.raises(ValueError, match="a str may be an image path or a SMILES"):
        client.embed(SMILES)
    with pytest.raises(ValueError, match="no items"):
        client.embed([])
    with pytest.raises(ValueError, match="embeds molecules, not images"):
        client.embed(SMILES, model=MOLECULE, modality="image")
    with pytest.raises(ValueError, match="modality must be"):
        client.embed(SMILES, modality="text")
    from rdkit import Chem

    mols = (Chem.MolFromSmiles(s) for s in SMILES)  # a generator: peeked, not lost
    embedded = client.embed(mols)
    assert embedded.spec.model == MOLECULE and len(embedded) == len(SMILES)
    empty = client.embed([], modality="image")
    assert empty.vectors.shape == (0, empty.spec.dimension)


def test_concurrent_requests_keep_the_callers_order(client: qc.Client) -> None:
    images = digits(24)
    one_by_one = client.embed_images(images, batch_size=3)
    concurrent = client.embed_images(iter(images), batch_size=3, concurrency=4)
    np.testing.assert_array_equal(concurrent, one_by_one)
    chunks = client.embed(images, batch_size=5, concurrency=3).vectors
    np.testing.assert_array_equal(chunks, one_by_one)


def test_the_first_error_stops_the_rest_and_names_the_callers_index(client: qc.Client) -> None:
    good = encode_png(digit(1))
    drawn = itertools.count()
    endless = itertools.chain([good] * 10, [b"junk"], itertools.repeat(good))

    def items() -> Iterator[bytes]:
        for item in endless:  # never ends: only a bounded window may be drawn
            next(drawn)
            yield item

    with pytest.raises(qc.InvalidInputError) as caught:
        client.embed_images(items(), batch_size=2, concurrency=3)
    assert caught.value.index == 10
    assert next(drawn) <= 12 + 2 * (3 + 1)  # the failed request, then at most a window more


def test_progress_bar_on_a_terminal_only_for_long_work(
    client: qc.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    images = digits(6)
    for progress, stderr_type, batch, shown in [
        (None, io.StringIO, 2, False),  # not a terminal
        (None, Terminal, 2, True),  # three requests
        (None, Terminal, 64, False),  # one request
        (True, io.StringIO, 64, True),
        (False, Terminal, 2, False),
    ]:
        stderr = stderr_type()
        monkeypatch.setattr(sys, "stderr", stderr)
        client.embed_images(images, batch_size=batch, progress=progress)
        text = stderr.getvalue()
        assert (f"embedding ({IMAGE})" in text) == shown, (progress, stderr_type, batch, text)
        if shown:
            assert "6/6" in text


def test_embed_stream_takes_the_items_of_embed(client: qc.Client) -> None:
    images = digits(7)
    chunks = list(client.embed_stream(images, batch_size=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert all(c.spec == chunks[0].spec for c in chunks) and chunks[0].spec.model == IMAGE
    np.testing.assert_allclose(
        np.concatenate([c.vectors for c in chunks]), client.embed_images(images), atol=1e-6
    )
    smiles = list(client.embed_stream(SMILES, modality="molecule"))
    assert len(smiles) == 1 and smiles[0].spec.model == MOLECULE

    bad = [*images[:4], {"not": "an image"}, images[0]]
    answered = []
    with pytest.raises(TypeError, match="input 4: cannot embed a dict"):
        for chunk in client.embed_stream(bad, batch_size=2):
            answered.append(len(chunk))
    assert answered == [2, 2]  # the requests before the bad item were answered
    junk = [*images[:3], b"junk"]
    with pytest.raises(qc.InvalidInputError) as caught:
        list(client.embed_stream(junk, batch_size=2))
    assert caught.value.index == 3
    with pytest.raises(TypeError, match="expected an item or a sequence"):
        list(client.embed_stream(3.5, modality="image"))

    raw = [pb.EmbedRequest(model=IMAGE, inputs=[pb.Input(image=pb.Image(data=b"junk"))])]
    (answer,) = client.embed_stream(raw)  # the low-level form: failures answered in the stream
    assert answer.HasField("error")
    assert qc.error_from_status(answer.error).code == grpc.StatusCode.INVALID_ARGUMENT


def test_targets_by_name(service: Any, start_service: Callable[..., Any], pki: Any) -> None:
    port = service.port
    with qc.Client(f"grpc://127.0.0.1:{port}") as plain:
        assert plain.health() == "SERVING"
    with pytest.raises(ValueError, match="plain text"):
        qc.Client(f"grpc://127.0.0.1:{port}", tls=True)
    with pytest.raises(ValueError, match="tls=False"):
        qc.Client(f"grpcs://127.0.0.1:{port}", tls=False)
    with pytest.raises(ValueError, match="api_key="):
        qc.Client(f"grpcs://key@127.0.0.1:{port}")
    with pytest.raises(ValueError, match="does not speak https"):
        qc.Client(f"https://127.0.0.1:{port}")

    secure = start_service(tls_cert_file=pki.server_pem, tls_key_file=pki.server_key)
    with qc.Client(f"grpcs://localhost:{secure.port}", tls_ca_file=pki.ca_pem) as client:
        assert client.health() == "SERVING"
        assert client.embed_images([digit(3)]).shape[0] == 1
    plain_to_tls = qc.Client(f"grpc://localhost:{secure.port}", timeout=2, retries=0)
    with plain_to_tls, pytest.raises(qc.ServiceUnavailableError):
        plain_to_tls.health()


def _documented_metric_names() -> list[re.Pattern[str]]:
    """The first column of the README's "Model metrics" table, as patterns."""
    readme = (Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md").read_text()
    section = readme.split("## Model metrics", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in re.findall(r"^\| (`.*?) \|", section, re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", row):
            text = re.escape(name).replace(r"\{", "{").replace(r"\}", "}")
            text = re.sub(r"\{([^}]*)\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", text)
            patterns.append(re.compile(re.sub(r"<[^>]+>", r"[A-Za-z0-9_]+", text) + "$"))
    return patterns


def test_every_published_metric_is_documented_and_described(client: qc.Client) -> None:
    patterns = _documented_metric_names()
    assert len(patterns) >= 8
    for model in client.list_models():
        assert model.metrics and set(model.metric_info) == set(model.metrics)
        for name, value in model.metrics.items():
            assert any(p.match(name) for p in patterns), f"{model.name}: {name} is undocumented"
            info = model.metric_info[name]
            assert info.value == value and info.description and info.command, info
