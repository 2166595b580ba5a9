"""The served molecule model: SMILES in, invariant embeddings out, and embeddings back to SMILES.

Runs from a model directory with the exported dense encoder/decoder (ONNX or TorchScript) and
RDKit; no PyG. Follows the ``EmbeddingModel`` contract of ``quotient_models.runtime`` (the family
that ``runtime.load_model`` finds by convention for modality "molecule"):

1. ``load(model_dir, engine, device, threads)`` (also ``load_molecule_model``) reads model.json
   (its ``domain`` and ``input.standardize`` policy), the encoder, the decoder and
   projection.json;
2. ``prepare(bytes, limits)``: one UTF-8 SMILES (or MolBlock / SDF record: text with line
   breaks) → item int64 [n, 4 + n] (atom indices | bonds),
   raising ``InputError`` with the reason; ``prepare_noted`` also returns what the model's
   standardisation changed and whether stereochemistry was dropped (``InputNote``s);
3. ``collate(items)`` → ``atoms`` [B, N, 4], ``bonds`` [B, N, N];
4. ``embed_batch(arrays, projection)`` → ``ProjectionOutput``;
5. ``decode(values, allow_inexact)``: ``sorted`` (or ``raw``) embeddings → canonical SMILES or a
   reason, per item, each decode verified by embedding its molecule again (``verify``).
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
    featurize_noted,
    key_coordinates,
)
from quotient_models.molecules.projections import SortedProjectionHead, orbit_distance
from quotient_models.molecules.standardize import Standardization
from quotient_models.notes import InputNote
from quotient_models.projections import ProjectionInfo, ProjectionOutput
from quotient_models.runtime import (
    ENGINES,
    EmbeddingModel,
    InputLimits,
    OnnxSession,
    PrepareOptions,
    TorchSession,
)
from quotient_models.spec import ModelSpec

__all__ = ["DECODE_TOLERANCE", "MoleculeModel", "connect_fragments", "load", "load_molecule_model"]

# How far (L2, rows paired by ``orbit_distance``) a decoded molecule's embedding may be from the
# embedding it was decoded from for the decode to count as exact (``MoleculeModel.verify``).
# Measured for qm9-vae 1.3.0 on 2000 molecules of each QM9 split (CPU): a correctly decoded
# molecule re-embeds at most 1.5e-6 away through ONNX (median 0: most are bit-identical), and
# TorchScript's embeddings are within 4.4e-6 of ONNX's (embedded by one engine, verified by the
# other: at most 4.4e-6); the nearest two distinct test molecules are 1.47 apart. 1e-3 is ~200x
# that noise and ~1000x below the distance between molecules: float noise or a change of engine
# does not refuse a correct decode, and no other molecule lies within it. GPU engines (TF32
# matrix products) are not measured here.
DECODE_TOLERANCE = 1e-3


class MoleculeModel(EmbeddingModel):
    """A permutation-equivariant graph encoder with its sorted projection head and decoder."""

    def __init__(
        self, spec: ModelSpec, encoder: Any, decoder: Any, head: SortedProjectionHead
    ) -> None:
        self.spec, self.encoder, self.decoder, self.head = spec, encoder, decoder, head
        self.domain = MoleculeDomain.from_json(spec.raw["domain"])
        # model.json "input.standardize" (standardize.py); absent: inputs embedded as sent
        try:
            self.policy = Standardization.from_json(spec.raw.get("input", {}).get("standardize"))
        except ValueError as exc:
            raise ValueError(f"model {spec.name!r}: {exc}") from None
        # sort-key coordinates put before every latent row (featurize.key_coordinates): the
        # sorted projection orders rows by them first; no projection outputs them
        self.n_type = len(head.key)
        # networks exported with a dynamic atom axis take a batch padded to its largest molecule
        # (cost by atoms); the others were traced at the domain's maximum
        self.dynamic_atoms = bool(spec.raw.get("encoder", {}).get("dynamic_atoms", False))
        self.decode_tolerance = DECODE_TOLERANCE

    def projections(self) -> list[ProjectionInfo]:
        return self._described(self.head)

    def graph(self, text: str) -> MolGraph:
        """SMILES, or a MolBlock / one SDF record (text with line breaks) → graph, standardised
        by the model's policy as served."""
        return featurize(text, self.domain, self.policy)

    def standardization(self) -> list[tuple[str, str]]:
        return self.policy.describe()

    def item(self, graph: MolGraph) -> np.ndarray:
        return np.concatenate(
            [encode_atoms(graph, self.domain), graph.bonds.astype(np.int64)], axis=1
        )

    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray:
        return self.prepare_noted(data, limits)[0]

    def prepare_noted(
        self, data: bytes, limits: InputLimits, options: PrepareOptions | None = None
    ) -> tuple[np.ndarray, tuple[InputNote, ...]]:
        """The item and its notes: the changes of the model's standardisation (none with
        ``options.standardize`` False) and the stereochemistry the graph ignores."""
        if len(data) > limits.max_input_bytes:
            raise InputError(
                f"molecule text of {len(data)} bytes exceeds the limit of {limits.max_input_bytes}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("molecule text is not valid UTF-8") from None
        policy = self.policy if options is None or options.standardize else Standardization()
        graph, notes = featurize_noted(text, self.domain, policy)
        return self.item(graph), notes

    def item_cost(self, item: np.ndarray) -> int:
        return int(item.shape[0])  # atoms

    def warmup_inputs(self) -> list[bytes]:
        """Ethanol."""
        return [b"CCO"]

    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        n_max = self.domain.max_atoms
        if self.dynamic_atoms:
            n_max = max((it.shape[0] for it in items), default=1)
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
            keys = key_coordinates(
                self.head.key, atoms, bonds, self.domain, self.head.colour_rounds
            )
            z = np.concatenate([keys, z], axis=-1)
        mask = atoms[..., 0] >= 0
        short = self.domain.max_atoms - z.shape[1]
        if short > 0:  # a batch padded to its largest molecule: the head takes max_atoms rows
            z = np.pad(z, ((0, 0), (0, short), (0, 0)))
            mask = np.pad(mask, ((0, 0), (0, short)))
        return z, mask

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

        A disconnected argmax graph is connected by its most probable missing bonds
        (``connect_fragments``): every molecule of the domain is one connected graph.
        Not verified: ``decode`` is this followed by ``verify``.
        """
        if canonical:
            zs, order = self.head.sort(z, mask)
            ms = np.take_along_axis(np.asarray(mask, dtype=bool), order, axis=1)
        else:  # real rows first, in their given order
            order = np.argsort(~np.asarray(mask, dtype=bool), axis=1, kind="stable")
            zs = np.take_along_axis(self.head.padded(z, mask), order[..., None], axis=1)
            ms = np.take_along_axis(np.asarray(mask, dtype=bool), order, axis=1)
        zs = np.where(ms[..., None], zs, np.float32(0))
        if self.dynamic_atoms:  # padding rows sort last: decode only up to the largest molecule
            n = max(int(ms.sum(axis=1).max(initial=0)), 1)
            zs, ms = zs[:, :n], ms[:, :n]
        el, ch, hy, bo = self.decoder(np.ascontiguousarray(zs, dtype=np.float32), ms)
        out = []
        for k in range(len(zs)):
            idx = np.flatnonzero(ms[k])  # padding sorts last, so these are 0..n-1
            if len(idx) == 0:
                out.append(DecodedMolecule(None, "embedding has no atoms (every row is padding)"))
                continue
            logits = bo[k][np.ix_(idx, idx)]
            bonds = logits.argmax(-1)
            bonds = np.maximum(
                np.triu(bonds, 1), np.triu(bonds, 1).T
            )  # symmetric; logits are already
            bonds = connect_fragments(bonds, logits)
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

    def decode(self, values: np.ndarray, allow_inexact: bool = False) -> list[DecodedMolecule]:
        """``sorted`` (or ``raw``) embeddings [B, N*d] → canonical SMILES or a reason, per item,
        each verified (``verify``): a SMILES comes back only when it embeds to the given
        embedding, unless ``allow_inexact``."""
        z, mask = self.head.unflatten(values)
        return self.verify(z, mask, self.decode_latent(z, mask), allow_inexact)

    def verify(
        self,
        z: np.ndarray,
        mask: np.ndarray,
        decoded: Sequence[DecodedMolecule],
        allow_inexact: bool = False,
    ) -> list[DecodedMolecule]:
        """Each decoded molecule embedded again, as Embed would embed its SMILES, and compared
        with the latent rows [B, N, d] (mask [B, N]) it was decoded from: ``distance`` is the L2
        distance between the two row sets with rows paired optimally (``orbit_distance``; a
        ``raw`` latent in any atom order counts like its ``sorted`` embedding, and for a sorted
        embedding of the decoded molecule it is the distance between the two embeddings, float
        noise aside). Beyond ``decode_tolerance`` the SMILES is withheld and the reason gives the
        distance (``allow_inexact``: returned anyway, for embeddings no molecule made, such as
        interpolations). The sorted projection loses nothing the encoder sees, so a verified
        decode is the molecule or one the encoder cannot tell from it (one that colour refinement
        does not separate from it: the same embedding up to float noise)."""
        out = list(decoded)
        items, where = [], []
        for k, d in enumerate(decoded):
            if d.smiles is None:
                continue
            try:
                items.append(self.item(self.graph(d.smiles)))
                where.append(k)
            except InputError as exc:
                out[k] = DecodedMolecule(
                    None, f"decoded {d.smiles} is no molecule this model embeds: {exc.reason}"
                )
        if not items:
            return out
        zr, mr = self.latent(self.collate(items))
        zr, tol = zr[..., self.n_type :], self.decode_tolerance
        pad = self.head.padding_row()
        for j, k in enumerate(where):
            given, again = z[k][mask[k]], zr[j][mr[j]]
            n = max(len(given), len(again))
            dist = orbit_distance(
                np.concatenate([given, np.tile(pad, (n - len(given), 1))]),
                np.concatenate([again, np.tile(pad, (n - len(again), 1))]),
            )
            smiles = decoded[k].smiles
            if dist <= tol or allow_inexact:
                out[k] = DecodedMolecule(smiles, None, dist)
            else:
                out[k] = DecodedMolecule(
                    None,
                    f"decoded {smiles} re-embeds {dist:.3g} away from this embedding (tolerance "
                    f"{tol:g}): the decoder does not reconstruct this embedding's molecule, if "
                    "it has one",
                    dist,
                )
        return out


def load_molecule_model(
    model_dir: str | Path, engine: str | None = "onnx", device: str = "cpu", threads: int = 0
) -> MoleculeModel:
    """The molecule family's loader, called by ``runtime.load_model`` for modality "molecule"."""
    spec = ModelSpec.load(model_dir)
    if spec.modality != "molecule":
        raise ValueError(f"{spec.name}: modality {spec.modality!r} is not a molecule model")
    encoder: Any
    decoder: Any
    if engine is None:
        encoder = decoder = _unavailable
    elif engine == "onnx":
        dynamic = bool(spec.raw.get("encoder", {}).get("dynamic_atoms", False))
        encoder = OnnxSession(spec.path("encoder", "onnx"), device, threads, dynamic)
        decoder = OnnxSession(spec.path("decoder", "onnx"), device, threads, dynamic)
    elif engine == "torch":
        encoder = TorchSession(spec.path("encoder", "torchscript"), device, threads)
        decoder = TorchSession(spec.path("decoder", "torchscript"), device, threads)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    head = SortedProjectionHead.load(spec.path("projection_head", "file"))
    return MoleculeModel(spec, encoder, decoder, head)


load = load_molecule_model


def connect_fragments(bonds: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Bond codes [n, n] (symmetric) of a decoded argmax graph, made connected with the bonds
    [n, n, len(BOND_NAMES)] ``logits`` find least unlikely: pairs in different fragments, by the
    log-probability given up, log p(none) - max over bond types of log p(type), in a minimum
    spanning tree over the fragments (Kruskal). With the decoder's pair outputs independent this
    is the most probable connected graph. qm9-vae decoded CO2, N2, cyanide, H2O2 and hydrazine as
    fragments and gives them back now (cyclopropane and oxirane are joined as chains and refused);
    any graph made here is still verified by re-embedding."""
    n = len(bonds)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(bonds, 1)), strict=True):
        parent[root(int(i))] = root(int(j))
    if len({root(i) for i in range(n)}) <= 1:
        return bonds
    lg = np.asarray(logits, dtype=np.float64)
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    logp = (logp + logp.transpose(1, 0, 2)) / 2
    kind = 1 + logp[..., 1:].argmax(-1)
    cost = logp[..., 0] - np.take_along_axis(logp, kind[..., None], -1)[..., 0]
    iu, ju = np.triu_indices(n, 1)
    out = np.array(bonds, copy=True)
    for p in np.argsort(cost[iu, ju], kind="stable"):
        i, j = int(iu[p]), int(ju[p])
        if root(i) != root(j):
            parent[root(i)] = root(j)
            out[i, j] = out[j, i] = kind[i, j]
    return out


def _unavailable(*_: np.ndarray) -> list[np.ndarray]:
    raise RuntimeError("this model was loaded without an encoder (engine=None)")
