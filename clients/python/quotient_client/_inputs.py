"""Turning the caller's items into request inputs, and splitting them into requests.

Images travel as encoded files. File paths are read, encoded bytes are sent as they are, numpy
arrays and PIL images are encoded as PNG (lossless; float arrays in [0, 1] are quantised to 8 bits,
the precision the server's decoder works at for 8-bit images).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

from quotient_client.proto import embedding_service_pb2 as pb

__all__ = [
    "ImageLike",
    "chunk_inputs",
    "encode_image",
    "image_inputs",
    "is_rdkit_mol",
    "iter_items",
    "molecule_inputs",
]

ImageLike: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | Image.Image"
)

_SINGLE_IMAGE = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_ITEM_OVERHEAD = 16  # bytes of protobuf framing per Input, generously


def iter_items(items: Any, single: tuple[type, ...]) -> Iterable[Any]:
    """``items`` as an iterable of items; a lone item of one of the ``single`` types → [item]."""
    if isinstance(items, single):
        return [items]
    if isinstance(items, Iterable):
        return items
    raise TypeError(f"expected an item or a sequence of items, got {type(items).__name__}")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless at any level; 1 is the fastest
    return buf.getvalue()


def _array_png(array: np.ndarray, index: int) -> bytes:
    a = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise ValueError(
            f"input {index}: an array of shape {array.shape} is not an image; expected HxW or "
            "HxWx{1,3,4} (for a batch stacked in one array, pass list(batch))"
        )
    if a.dtype == np.uint8:
        pixels = a
    elif a.dtype == np.bool_:
        pixels = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"input {index}: float image contains NaN or infinite values")
        low, high = float(a.min()), float(a.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"input {index}: float image values must lie in [0, 1], found "
                f"[{low:.4g}, {high:.4g}]; rescale it or pass uint8"
            )
        pixels = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        low, high = int(a.min()), int(a.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"input {index}: integer image values must lie in [0, 255], found "
                f"[{low}, {high}]; rescale it to uint8"
            )
        pixels = a.astype(np.uint8)
    else:
        raise ValueError(
            f"input {index}: unsupported array dtype {a.dtype}; pass uint8 or float in [0, 1]"
        )
    return _png(Image.fromarray(np.ascontiguousarray(pixels)))


def _read(path: str | os.PathLike[str], index: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:  # same type, with the caller's index in the message
        raise type(exc)(exc.errno, f"input {index}: {exc.strerror}", os.fspath(path)) from exc


def encode_image(item: Any, index: int) -> bytes:
    """One image item → encoded bytes. ``index`` (the caller's) is named in every error."""
    if isinstance(item, (str, os.PathLike)):
        return _read(item, index)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return _array_png(item, index)
    if isinstance(item, Image.Image):
        if item.mode == "F":  # 32-bit float pixels: same rules as float arrays
            return _array_png(np.asarray(item), index)
        if item.mode not in _PNG_MODES:
            item = item.convert("RGBA" if "A" in item.getbands() else "RGB")
        return _png(item)
    raise TypeError(
        f"input {index}: cannot embed a {type(item).__name__} as an image; pass a "
        "path, encoded bytes, a numpy array or a PIL image"
    )


def image_inputs(images: Any) -> Iterator[pb.Input]:
    """Lazily encode the caller's images (an item or an iterable of items) as ``Input`` messages."""
    for index, item in enumerate(iter_items(images, _SINGLE_IMAGE)):
        yield pb.Input(image=pb.Image(data=encode_image(item, index)))


def is_rdkit_mol(item: Any) -> bool:
    """Whether ``item`` is an RDKit ``Mol`` (without importing RDKit)."""
    cls = type(item)
    return cls.__name__ in ("Mol", "RWMol") and cls.__module__.startswith("rdkit")


def molecule_input(item: Any, index: int) -> pb.Input:
    """One molecule as an ``Input``: a SMILES str; MolBlock or SDF text (a str with line breaks,
    e.g. a .mol/.sdf file's contents); or an RDKit ``Mol`` (sent as a MolBlock, atom order
    kept; needs RDKit on the client)."""
    if is_rdkit_mol(item):
        from rdkit import Chem

        return pb.Input(molecule=pb.Molecule(molblock=Chem.MolToMolBlock(item)))
    if not isinstance(item, str):
        raise TypeError(
            f"input {index}: a molecule must be a SMILES or MolBlock str or an RDKit Mol, got "
            f"{type(item).__name__}"
        )
    if "\n" in item.strip():
        return pb.Input(molecule=pb.Molecule(molblock=item))
    return pb.Input(molecule=pb.Molecule(smiles=item))


def molecule_inputs(molecules: Any) -> Iterator[pb.Input]:
    """The caller's molecules (one or an iterable; see ``molecule_input``) as ``Input``s."""
    items = [molecules] if is_rdkit_mol(molecules) else iter_items(molecules, (str,))
    for index, item in enumerate(items):
        yield molecule_input(item, index)


def chunk_inputs(
    inputs: Iterable[pb.Input], max_items: int, max_bytes: int
) -> Iterator[tuple[int, list[pb.Input]]]:
    """Group inputs into requests of at most ``max_items`` items and about ``max_bytes`` bytes,
    in order; yields (index of the chunk's first item, chunk), a full chunk as soon as it is
    full (not when the next item is drawn: that one may be slow to come, or fail). A single
    input larger than ``max_bytes`` is refused here: gRPC would refuse the message anyway, less
    clearly."""
    if max_items < 1:
        raise ValueError(f"batch_size must be at least 1, got {max_items}")
    start, size, chunk = 0, 0, list[pb.Input]()
    for index, item in enumerate(inputs):
        cost = item.ByteSize() + _ITEM_OVERHEAD
        if cost > max_bytes:
            raise ValueError(
                f"input {index}: {cost} bytes encoded, above the message limit of "
                f"{max_bytes} bytes (Client(max_message_bytes=...))"
            )
        if chunk and size + cost > max_bytes:
            yield start, chunk
            start, size, chunk = index, 0, []
        chunk.append(item)
        size += cost
        if len(chunk) == max_items:
            yield start, chunk
            start, size, chunk = index + 1, 0, []
    if chunk:
        yield start, chunk
