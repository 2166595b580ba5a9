"""Coverage-guided fuzz targets (atheris, i.e. libFuzzer) for what a client can send.

    python tests/fuzz/targets.py image|molecule|protobuf CORPUS_DIR [libFuzzer flags]

- ``image``: bytes → the image model's ``prepare`` (the decoder and the input policy);
- ``molecule``: bytes → the molecule model's ``prepare`` (SMILES or MolBlock, the cheap bounds,
  RDKit, the domain checks);
- ``protobuf``: bytes → a real in-process Quotient server, as the body of one of its methods
  (first byte chooses which), through its interceptors, servicer, engine and batcher.

A finding is any exception other than ``InputError`` (the model's refusal), an ``image``/
``molecule`` result that is not finite or has the wrong shape, a ``protobuf`` answer whose status
is not one a bad request may get (INTERNAL, UNKNOWN, ...) or one that carries a non-finite value,
and, through libFuzzer's ``-timeout``, an input that takes too long. libFuzzer then writes the
input to ``-artifact_prefix`` and exits non-zero. The seed corpus comes from ``seed(target,
directory)``; ``tests/fuzz/test_fuzz.py`` runs each target for a bounded time, ``make fuzz`` longer.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import atheris
import grpc  # not instrumented: outside the code under test
import numpy as np

_UNDER_TEST = ["quotient_models", "quotient_service", "quotient_client.proto", "PIL"]
with atheris.instrument_imports(include=_UNDER_TEST):
    from PIL import Image

    import quotient_models.molecules.model  # noqa: F401  (load_model imports it lazily)
    from quotient_client.proto import embedding_service_pb2 as pb
    from quotient_models.errors import InputError
    from quotient_models.runtime import InputLimits, load_model
    from quotient_service.config import Settings
    from quotient_service.server import create_server

    Image.init()  # Pillow's format plugins, imported lazily otherwise

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / "model_store" / "models"
LIMITS = InputLimits(max_input_bytes=1 << 20, max_pixels=1 << 20)
_state: dict[str, Any] = {}


def _image(data: bytes) -> None:
    model = _state.setdefault("image", load_model(STORE / "rotmnist-c8", engine=None))
    try:
        out = model.prepare(data, LIMITS)
    except InputError:
        return
    size = model.spec.input_size
    if out.shape != (1, size, size) or not np.isfinite(out).all():
        raise AssertionError(f"bad model input: shape {out.shape}, finite {np.isfinite(out).all()}")
    if out.min() < 0 or out.max() > 1:
        raise AssertionError(f"model input outside [0, 1]: {out.min()}..{out.max()}")


def _molecule(data: bytes) -> None:
    model = _state.setdefault("molecule", load_model(STORE / "qm9-vae", engine=None))
    try:
        out = model.prepare(data, LIMITS)
    except InputError:
        return
    if out.ndim != 2 or not 1 <= out.shape[0] <= model.domain.max_atoms:
        raise AssertionError(f"bad graph item of shape {out.shape}")


# --- protobuf: a real server in this process
_METHODS = ("Embed", "EmbedStream", "Decode", "GetModel", "ListModels")
# statuses a malformed, hostile or simply wrong request may get; never INTERNAL or UNKNOWN
_ALLOWED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "OUT_OF_RANGE",
}


def _server() -> Any:
    if "server" not in _state:
        import asyncio
        import threading

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def start() -> int:
            settings = Settings(port=0, metrics_port=0, max_pixels=1 << 20, decode_threads=1)
            _, port, app = await create_server(settings)
            await app.start()
            return port

        port = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        _state["server"] = channel
    return _state["server"]


def _protobuf(data: bytes) -> None:
    if not data:
        return
    channel = _server()
    method, body = _METHODS[data[0] % len(_METHODS)], data[1:]
    path = f"/quotient.v1.EmbeddingService/{method}"
    try:
        if method == "EmbedStream":
            call = channel.stream_stream(path)
            answers = list(call(iter(body.split(b"\x00\x00\x00\x00")), timeout=20))
        else:
            answers = [channel.unary_unary(path)(body, timeout=20)]
        code = "OK"
    except grpc.RpcError as err:
        code, answers = err.code().name, []
        if code not in _ALLOWED:
            raise AssertionError(f"{method}: {code} {err.details()!r}") from None
    _check_answers(method, answers)
    if code not in _ALLOWED:
        raise AssertionError(f"{method}: {code}")


def _check_answers(method: str, answers: list[bytes]) -> None:
    for raw in answers:
        if method == "Embed":
            rows = [e.values for e in pb.EmbedResponse.FromString(raw).embeddings]
        elif method == "EmbedStream":
            answer = pb.EmbedStreamResponse.FromString(raw)
            if answer.HasField("error") and answer.error.code in (2, 13):  # UNKNOWN, INTERNAL
                raise AssertionError(f"EmbedStream answer: {answer.error}")
            rows = [e.values for e in answer.response.embeddings]
        else:
            rows = []
        for row in rows:
            if not all(math.isfinite(v) for v in row):
                raise AssertionError(f"{method} answered a non-finite value")


TARGETS = {"image": _image, "molecule": _molecule, "protobuf": _protobuf}


def seed(target: str, directory: Path) -> None:
    """Write a small, valid seed corpus for ``target`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    rng = np.random.default_rng(0)
    digit = (rng.random((28, 28)) > 0.7).astype(np.uint8) * 255
    images = []
    for fmt, mode in (("PNG", "L"), ("JPEG", "L"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "F")):
        buf = io.BytesIO()
        Image.fromarray(digit).convert(mode).save(buf, format=fmt)
        images.append(buf.getvalue())
    molecules = [b"CCO", b"c1ccccc1O", b"C[N+](C)(C)[O-]", b"OC(=O)C1CC1", b"N#N", b"[H]C([H])O"]
    molblock = (
        b"\n  RDKit          2D\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\n"
        b"    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0\n"
        b"    1.2990    0.7500    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0\n"
        b"    2.5981   -0.0000    0.0000 O   0  0  0  0  0  0  0  0  0  0  0  0\n"
        b"  1  2  1  0\n  2  3  1  0\nM  END\n"
    )
    if target == "image":
        seeds = images
    elif target == "molecule":
        seeds = [*molecules, molblock]
    else:
        embed_image = pb.EmbedRequest(
            model="rotmnist-c8", inputs=[pb.Input(image=pb.Image(data=images[0]))]
        )
        embed_mol = pb.EmbedRequest(
            model="qm9-vae",
            inputs=[pb.Input(molecule=pb.Molecule(smiles=m.decode())) for m in molecules[:3]],
            projection="sorted",
        )
        decode = pb.DecodeRequest(model="qm9-vae", embeddings=[pb.Embedding(values=[0.0] * 72)])
        bodies = [
            (0, embed_image.SerializeToString()),
            (0, embed_mol.SerializeToString()),
            (
                1,
                embed_mol.SerializeToString()
                + b"\x00\x00\x00\x00"
                + embed_image.SerializeToString(),
            ),
            (2, decode.SerializeToString()),
            (3, pb.GetModelRequest(name="qm9-vae").SerializeToString()),
            (4, pb.ListModelsRequest(page_size=1).SerializeToString()),
        ]
        seeds = [bytes([k]) + body for k, body in bodies]
    for k, data in enumerate(seeds):
        (directory / f"seed-{k}").write_bytes(data)


def main(argv: list[str]) -> None:
    target = TARGETS[argv[1]]

    def one(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
