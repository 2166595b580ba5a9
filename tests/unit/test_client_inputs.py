"""quotient_client input handling: conversion of each input type, local validation, chunking, and
the client's calls against a small real gRPC server (written here) that echoes what it decodes."""

from __future__ import annotations

import io
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from quotient_client import Client, ModelNotFoundError, encode_image
from quotient_client._inputs import chunk_inputs, image_inputs, molecule_inputs
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

DIM = 3


def _model(name: str, modality: int = pb.MODALITY_IMAGE, max_inputs: int = 0) -> pb.Model:
    return pb.Model(
        name=name,
        version="1",
        modality=modality,
        default_projection="mean",
        group=pb.SymmetryGroup(name="C4", order=4),
        projections=[
            pb.Projection(name="mean", dimension=DIM, invariant=True),
            pb.Projection(name="align", dimension=DIM, invariant=True, returns_pose=True),
        ],
        input_limits=pb.InputLimits(max_inputs_per_request=max_inputs, model_input_size=28),
        metrics=[pb.Metric(name="accuracy", value=0.5)],
        model_card="# card",
    )


class EchoService(pb_grpc.EmbeddingServiceServicer):
    """Embeds an image as [mean gray level, width, height] and a SMILES as [len, 0, 0]; lists its
    models one per page; records every request and its metadata."""

    def __init__(self, models: list[pb.Model]) -> None:
        self.models = {m.name: m for m in models}
        self.requests: list[pb.EmbedRequest] = []
        self.metadata: list[dict[str, str]] = []

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        response = pb.EmbedResponse(model=request.model, projection=request.projection or "mean")
        for item in request.inputs:
            if item.HasField("image"):
                image = Image.open(io.BytesIO(item.image.data))
                gray = np.asarray(image.convert("L"), np.float64)
                embedding = pb.Embedding(values=[gray.mean(), image.width, image.height])
            else:
                embedding = pb.Embedding(values=[len(item.molecule.smiles), 0, 0])
            if request.projection == "align":
                embedding.pose.rotation_degrees = 90.0
            response.embeddings.append(embedding)
        return response

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        names = sorted(self.models)
        at = int(request.page_token or 0)
        token = str(at + 1) if at + 1 < len(names) else ""
        return pb.ListModelsResponse(models=[self.models[names[at]]], next_page_token=token)

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        if request.name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return self.models[request.name]


@pytest.fixture
def serve():
    servers: list[grpc.Server] = []

    def start(servicer: EchoService) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def _decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


# ---------------------------------------------------------------- conversion of each input type
def test_paths_and_bytes_are_sent_as_they_are(tmp_path: Path) -> None:
    data = b"\x89PNG any bytes at all"
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for item in (str(path), path, data, bytearray(data), memoryview(data)):
        assert encode_image(item, 0) == data


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_uint8_arrays_round_trip_through_png(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = array[..., 0] if shape[-1:] == (1,) else array
    np.testing.assert_array_equal(_decode(encode_image(array, 0)), expected)


def test_float_bool_and_int_arrays_are_scaled_to_8_bits() -> None:
    floats = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_decode(encode_image(floats, 0)), np.rint(floats * 255))
    mask = np.eye(3, dtype=bool)
    np.testing.assert_array_equal(_decode(encode_image(mask, 0)), mask * 255)
    ints = np.arange(12).reshape(3, 4) * 20
    np.testing.assert_array_equal(_decode(encode_image(ints, 0)), ints)


def test_pil_images_become_png() -> None:
    array = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode(encode_image(Image.fromarray(array), 0)), array)
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")
    np.testing.assert_array_equal(_decode(encode_image(floats, 0)), np.full((4, 4), 128))
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))
    assert _decode(encode_image(cmyk, 0)).shape == (3, 3, 3)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN or infinite"),
        (np.array([[0.0, 1.5]]), "[0, 1]"),
        (np.array([[-0.1, 0.5]]), "[0, 1]"),
        (np.zeros((4, 28, 28), np.uint8), "list(batch)"),
        (np.zeros((2, 2, 2, 2), np.uint8), "not an image"),
        (np.zeros((0, 3), np.uint8), "not an image"),
        (np.array([[0, 256]]), "[0, 255]"),
        (np.zeros((2, 2), np.complex64), "dtype"),
    ],
)
def test_bad_arrays_raise_value_error_naming_the_index(bad: np.ndarray, words: str) -> None:
    items = [np.zeros((2, 2), np.uint8)] * 3 + [bad]
    with pytest.raises(ValueError, match=r"^input 3: ") as info:
        list(image_inputs(items))
    assert words in str(info.value)


def test_unreadable_path_and_unknown_type_name_the_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="input 1"):
        list(image_inputs([b"x", tmp_path / "missing.png"]))
    with pytest.raises(TypeError, match="input 0"):
        list(image_inputs([3.5]))
    with pytest.raises(TypeError, match="sequence"):
        list(image_inputs(3.5))


def test_chunks_respect_count_and_bytes_and_refuse_oversize_items() -> None:
    inputs = [pb.Input(image=pb.Image(data=bytes(100))) for _ in range(7)]
    assert [(s, len(c)) for s, c in chunk_inputs(inputs, 3, 10_000)] == [(0, 3), (3, 3), (6, 1)]
    assert [(s, len(c)) for s, c in chunk_inputs(inputs, 64, 200)] == [(i, 1) for i in range(7)]
    assert [(s, len(c)) for s, c in chunk_inputs(inputs, 64, 400)] == [(0, 3), (3, 3), (6, 1)]
    with pytest.raises(ValueError, match=r"input 0: .* above the message limit"):
        list(chunk_inputs(inputs, 3, 50))


# ---------------------------------------------------------------- against the echo server
def test_every_input_type_gives_the_same_vector_in_order(serve, tmp_path: Path) -> None:
    service = EchoService([_model("echo")])
    levels = [np.full((4, 6), 10 * k, np.uint8) for k in range(10)]
    path = tmp_path / "k3.png"
    Image.fromarray(levels[3]).save(path)
    png5 = encode_image(levels[5], 5)
    items: list = list(levels)
    items[1] = levels[1].astype(np.float64) / 255.0
    items[2] = Image.fromarray(levels[2])
    items[3], items[4], items[5] = str(path), path, png5
    with Client(serve(service), metadata={"authorization": "Bearer t"}) as client:
        vectors = client.embed_images(items, batch_size=3)
        assert vectors.dtype == np.float32 and vectors.shape == (10, DIM)
        expected = [10 * k for k in range(10)]
        expected[4] = 30  # items[4] is the k=3 file again
        np.testing.assert_allclose(vectors[:, 0], expected)
        np.testing.assert_allclose(vectors[:, 1:], [[6, 4]] * 10)
        assert [len(r.inputs) for r in service.requests] == [3, 3, 3, 1]
        assert all(r.model == "echo" and r.projection == "" for r in service.requests)
        assert service.metadata[0]["authorization"] == "Bearer t"
        one = client.embed_images(levels[7])  # a single item, not a list
        assert one.shape == (1, DIM) and one[0, 0] == 70
        generated = client.embed_images(level for level in levels[:2])
        assert generated.shape == (2, DIM)


def test_model_limit_caps_the_batch_and_poses_are_returned(serve) -> None:
    service = EchoService([_model("echo", max_inputs=4)])
    with Client(serve(service)) as client:
        images = [np.zeros((3, 3), np.uint8)] * 9
        client.embed_images(images)
        assert [len(r.inputs) for r in service.requests] == [4, 4, 1]
        with pytest.raises(ValueError, match=r"'mean' of model 'echo' computes no pose.*: align"):
            client.embed_images(images, return_poses=True)  # refused before anything is sent
        assert len(service.requests) == 3
        poses = client.embed(images, model="echo").poses  # Embeddings: NaN where none
        assert poses.shape == (9,) and np.isnan(poses).all()
        vectors, poses = client.embed_images(images[:2], projection="align", return_poses=True)
        assert vectors.shape == (2, DIM)
        np.testing.assert_array_equal(poses, [90.0, 90.0])
        empty = client.embed_images([])
        assert empty.shape == (0, DIM) and empty.dtype == np.float32
        with pytest.raises(ValueError, match="batch_size"):
            client.embed_images(images, batch_size=0)


def test_default_models_listing_and_model_info(serve) -> None:
    service = EchoService([_model("b-image"), _model("a-mol", pb.MODALITY_MOLECULE)])
    with Client(serve(service)) as client:
        models = client.list_models()  # one per page: follows the page tokens
        assert [m.name for m in models] == ["a-mol", "b-image"]
        info = client.get_model("b-image")
        assert info.modality == "image" and info.group.order == 4
        assert info.projection().name == "mean" and info.projection("align").returns_pose
        assert info.metrics == {"accuracy": 0.5} and info.input_limits.model_input_size == 28
        np.testing.assert_array_equal(client.embed_molecules(["CCO", "C"])[:, 0], [3, 1])
        assert client.embed_molecules("CCCC").shape == (1, DIM)
        assert client.embed_images(encode_image(np.zeros((2, 2)), 0)).shape == (1, DIM)
        assert service.requests[-1].model == "b-image"
        with pytest.raises(ValueError, match="embeds molecules"):
            client.embed_images([np.zeros((2, 2))], model="a-mol")
        with pytest.raises(ModelNotFoundError, match="no model 'nope'"):
            client.embed_images([np.zeros((2, 2))], model="nope")


def test_default_model_must_be_unique(serve) -> None:
    service = EchoService([_model("one"), _model("two")])
    with Client(serve(service)) as client:
        with pytest.raises(ValueError, match=r"several image models \(one, two\)"):
            client.embed_images([np.zeros((2, 2))])
        with pytest.raises(ModelNotFoundError, match="no molecule model"):
            client.embed_molecules(["C"])
        assert client.embed_images([np.zeros((2, 2))], model="two").shape == (1, DIM)


def test_molecule_inputs_pick_the_format() -> None:
    block = "ethanol\n  RDKit\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\nM  END\n"
    got = list(molecule_inputs(["CCO", block, "  CC \n"]))
    assert [m.molecule.WhichOneof("format") for m in got] == ["smiles", "molblock", "smiles"]
    assert got[1].molecule.molblock == block and got[2].molecule.smiles == "  CC \n"
    assert [m.molecule.smiles for m in molecule_inputs("CCO")] == ["CCO"]
    with pytest.raises(TypeError, match="input 1: a molecule must be"):
        list(molecule_inputs(["C", 3]))


def test_rdkit_mols_travel_as_molblocks() -> None:
    chem = pytest.importorskip("rdkit.Chem", reason="RDKit is optional for the client")
    mol = chem.MolFromSmiles("OCC")
    (one,) = molecule_inputs(mol)
    assert one.molecule.WhichOneof("format") == "molblock"
    back = chem.MolFromMolBlock(one.molecule.molblock)
    assert [a.GetSymbol() for a in back.GetAtoms()] == ["O", "C", "C"]  # atom order kept
