"""The served molecule model: SMILES in, invariant embeddings out, and embeddings back to SMILES.

Runs from a model directory with the exported dense encoder/decoder (ONNX or TorchScript) and
RDKit; no PyG. Follows the ``EmbeddingModel`` contract of ``quotient_models.runtime``:

1. ``load_molecule_model(model_dir, engine, device)`` reads model.json (its ``domain``), the
   encoder, the decoder and projection.json;
2. ``prepare(bytes, limits)``: one UTF-8 SMILES (or MolBlock / SDF record: text with line
   breaks) → item int64 [n, 4 + n] (atom indices | bonds),
   raising ``InputError`` with the reason;
3. ``collate(items)`` → ``atoms`` [B, N, 4], ``bonds`` [B, N, N];
4. ``embed_batch(arrays, projection)`` → ``ProjectionOutput``;
5. ``decode(values)``: ``sorted`` (or ``raw``) embeddings → canonical SMILES or a reason, per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quotient_models.errors import InputError
from quotient_models.molecules.featurize import (
    DecodedMolecule,
    MoleculeDomain,
    MolGraph,
    collate_graphs,
    decode_graph,
    encode_atoms,
    featurize,
    type_coordinates,
)
from quotient_models.molecules.projections import SortedProjectionHead
from quotient_models.projections import ProjectionInfo, ProjectionOutput
from quotient_models.runtime import ENGINES, EmbeddingModel, InputLimits, OnnxSession, TorchSession
from quotient_models.spec import ModelSpec

__all__ = ["MoleculeModel", "load_molecule_model"]


class MoleculeModel(EmbeddingModel):
    """A permutation-equivariant graph encoder with its sorted projection head and decoder."""

    def __init__(
        self, spec: ModelSpec, encoder: Any, decoder: Any, head: SortedProjectionHead
    ) -> None:
        self.spec, self.encoder, self.decoder, self.head = spec, encoder, decoder, head
        self.domain = MoleculeDomain.from_json(spec.raw["domain"])
        # sort-key coordinates put before every latent row (featurize.type_coordinates): the
        # sorted projection orders rows by them first; no projection outputs them
        self.n_type = len(head.key)

    def projections(self) -> list[ProjectionInfo]:
        return self.head.describe()

    def graph(self, text: str) -> MolGraph:
        """SMILES, or a MolBlock / one SDF record (text with line breaks) → graph."""
        return featurize(text, self.domain)

    def item(self, graph: MolGraph) -> np.ndarray:
        return np.concatenate(
            [encode_atoms(graph, self.domain), graph.bonds.astype(np.int64)], axis=1
        )

    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray:
        if len(data) > limits.max_input_bytes:
            raise InputError(
                f"molecule text of {len(data)} bytes exceeds the limit of {limits.max_input_bytes}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("molecule text is not valid UTF-8") from None
        return self.item(self.graph(text))

    def item_cost(self, item: np.ndarray) -> int:
        return int(item.shape[0])  # atoms

    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        n_max = self.domain.max_atoms
        atoms = np.full((len(items), n_max, 4), -1, dtype=np.int64)
        bonds = np.zeros((len(items), n_max, n_max), dtype=np.int64)
        for k, it in enumerate(items):
            n = it.shape[0]
            atoms[k, :n] = it[:, :4]
            bonds[k, :n, :n] = it[:, 4:]
        return {"atoms": atoms, "bonds": bonds}

    def collate_graphs(self, graphs: Sequence[MolGraph]) -> dict[str, np.ndarray]:
        return collate_graphs(graphs, self.domain)

    def latent(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom rows [B, N, k + d] (input order) and the mask of real atoms [B, N]: the k
        sort-key (atom type) coordinates, if the model has them, then the encoder's latent."""
        atoms, bonds = arrays["atoms"].astype(np.int64), arrays["bonds"].astype(np.int64)
        z = self.encoder(atoms, bonds)[0]
        if self.n_type:
            z = np.concatenate([type_coordinates(atoms, bonds, self.domain), z], axis=-1)
        return z, atoms[..., 0] >= 0

    def embed_batch(
        self, arrays: dict[str, np.ndarray], projection: str | None = None
    ) -> ProjectionOutput:
        z, mask = self.latent(arrays)
        return self.head.apply(self.resolve_projection(projection), z, mask)

    def embed_smiles(
        self, smiles: Sequence[str], projection: str | None = None
    ) -> ProjectionOutput:
        """Convenience for scripts and tests: SMILES → embeddings (raises the first InputError)."""
        items = []
        for k, s in enumerate(smiles):
            try:
                items.append(self.item(self.graph(s)))
            except InputError as exc:
                raise exc.at(k) from None
        return self.embed_batch(self.collate(items), projection)

    def decode_latent(
        self, z: np.ndarray, mask: np.ndarray, canonical: bool = True
    ) -> list[DecodedMolecule]:
        """Latents [B, N, d] with masks → molecules (argmax of every head).

        Decoding is canonical: the rows are first put in one canonical order, the
        lexicographic order of the latent rows (``head.sort``, ``tolerant_order``; the sort-key
        columns are not part of an embedding, so not of this order), and both the decoder and the
        graph construction run in that order. Mathematically the decoder is equivariant and the
        order would not matter, but in floating point permuted rows change the logits by ~1e-7
        (an argmax near-tie could flip), and RDKit's sanitisation/kekulisation of a decoded graph
        may depend on its atom numbering. With one canonical order the ``sorted`` embedding and
        the ``raw`` latent of a molecule (any row order) reach the decoder bit-identically and
        decode to the same result deterministically. Atom numbers in reasons are sorted rows.
        ``canonical=False`` decodes the rows in the given order (a diagnostic only).
        """
        if canonical:
            zs, order = self.head.sort(z, mask)
            ms = np.take_along_axis(np.asarray(mask, dtype=bool), order, axis=1)
        else:  # real rows first, in their given order
            order = np.argsort(~np.asarray(mask, dtype=bool), axis=1, kind="stable")
            zs = np.take_along_axis(self.head.padded(z, mask), order[..., None], axis=1)
            ms = np.take_along_axis(np.asarray(mask, dtype=bool), order, axis=1)
        zs = np.where(ms[..., None], zs, np.float32(0))
        el, ch, hy, bo = self.decoder(np.ascontiguousarray(zs, dtype=np.float32), ms)
        out = []
        for k in range(len(zs)):
            idx = np.flatnonzero(ms[k])  # padding sorts last, so these are 0..n-1
            if len(idx) == 0:
                out.append(DecodedMolecule(None, "embedding has no atoms (every row is padding)"))
                continue
            bonds = bo[k].argmax(-1)[np.ix_(idx, idx)]
            bonds = np.maximum(
                np.triu(bonds, 1), np.triu(bonds, 1).T
            )  # symmetric; logits are already
            out.append(
                decode_graph(
                    [self.domain.elements[i] for i in el[k, idx].argmax(-1)],
                    [self.domain.charges[i] for i in ch[k, idx].argmax(-1)],
                    hy[k, idx].argmax(-1).tolist(),
                    bonds,
                )
            )
        return out

    @property
    def can_decode(self) -> bool:
        return True

    def decode_input_error(self, values: np.ndarray) -> str | None:
        return self.head.embedding_error(values)

    def decode(self, values: np.ndarray) -> list[DecodedMolecule]:
        """``sorted`` (or ``raw``) embeddings [B, N*d] → canonical SMILES or a reason, per item."""
        z, mask = self.head.unflatten(values)
        return self.decode_latent(z, mask)


def load_molecule_model(
    model_dir: str | Path, engine: str | None = "onnx", device: str = "cpu", threads: int = 0
) -> MoleculeModel:
    """What ``runtime.load_model`` should call for modality "molecule"."""
    spec = ModelSpec.load(model_dir)
    if spec.modality != "molecule":
        raise ValueError(f"{spec.name}: modality {spec.modality!r} is not a molecule model")
    encoder: Any
    decoder: Any
    if engine is None:
        encoder = decoder = _unavailable
    elif engine == "onnx":
        encoder = OnnxSession(spec.path("encoder", "onnx"), device, threads)
        decoder = OnnxSession(spec.path("decoder", "onnx"), device, threads)
    elif engine == "torch":
        encoder = TorchSession(spec.path("encoder", "torchscript"), device, threads)
        decoder = TorchSession(spec.path("decoder", "torchscript"), device, threads)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    head = SortedProjectionHead.load(spec.path("projection_head", "file"))
    return MoleculeModel(spec, encoder, decoder, head)


def _unavailable(*_: np.ndarray) -> list[np.ndarray]:
    raise RuntimeError("this model was loaded without an encoder (engine=None)")
