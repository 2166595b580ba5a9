"""Projections of permutation-equivariant node latents (Hansen et al., ICML 2024, case 1).

A molecule's latent is Z ∈ R^{n×d}, one row per heavy atom; renumbering the atoms permutes the
rows. A batch travels padded to the model's maximum atom count N as ``z`` [B, N, d] with a boolean
``mask`` [B, N] of real rows.

- ``sorted`` (default): rows in lexicographic order (first column, ties broken by the next, ...),
  padded with padding rows, flattened → [B, N*d]. A cross-section of the permutation orbit:
  lossless, and the result is itself a (permuted) latent that the decoder can decode. Isometric
  for d = 1. With a sort ``key`` (e.g. each atom's type, ``featurize.key_coordinates``), the
  rows given to ``apply`` start with those key columns: rows are ordered by them first, and no
  projection outputs them (qm9-vae: atoms by element, degree, hydrogens, then by latent;
  druglike-vae >= 1.1: then by the atom's message-passing colour, ``featurize.colour_ranks``,
  then by latent).
- ``sum`` / ``mean``: pooling over the atoms → [B, d]: invariant, lossy baselines.
- ``raw``: the rows in the input's atom order, padded, flattened: NOT invariant.

Ties. Two rows can differ only by float noise (symmetric atoms), or two different rows can share
a first coordinate up to noise; a plain sort can then order them differently for two numberings
of one molecule. Each column is therefore compared with a tolerance ``tol``: the column's values
are grouped by single linkage (consecutive sorted values closer than ``tol`` fall in one group,
which depends only on the set of values, not on their order) and rows are ordered by their group
numbers, column by column. Rows that tie in every column are within a few ``tol`` of each other,
so their order changes the output by at most that.

Tolerance alone does not make the order stable: two different rows whose first values lie about
``tol`` apart are grouped in one numbering and not in another, and then order differently (2 of
50,000 MOSES test molecules under druglike-vae 1.0.0, by 0.24 and 0.12 relative). A discrete key
removes that boundary: the colour of ``featurize.colour_ranks`` is computed from the graph, and an
encoder of as many message-passing layers gives two atoms of one colour the same latent up to
float noise, so the latent only ever orders rows that are equal up to noise.

Padding. Real coordinates are bounded, |z| < ``latent_bound`` (the encoder ends in a scaled
tanh). A padding row ("marker", the default) is (``pad_value``, 0, ..., 0) with ``pad_value`` >
``latent_bound``: its first value lies outside the box of real rows, so it can never equal a real
row, sorts after every real row (its sort-key columns are ``pad_value`` too), and is recognised on
decoding. Its squared distance to a real row z is about pad_value² + ‖z‖², close to that between
two real rows, so an atom one molecule has and another lacks weighs in a distance about as much
as an atom they both have but with different latents. The "fill" padding of qm9-vae <= 1.2.0
(every value ``pad_value`` = 2) put a missing atom about d·4 + ‖z‖² ≈ 34 away in squared
distance, against about 4.7 between two of its real rows, so that the nearest neighbours of a
molecule all had its atom count (the qm9-vae card measures both paddings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quotient_models.projections import ProjectionInfo, ProjectionOutput

__all__ = [
    "PADDINGS",
    "SortedProjectionHead",
    "min_cost_assignment",
    "orbit_distance",
    "tolerant_order",
]

# How a missing atom's row is written: "marker" = (pad_value, 0, ..., 0), "fill" = every value
# pad_value (projection.json files without a "padding" entry, qm9-vae <= 1.2.0).
PADDINGS = ("marker", "fill")


def _column_groups(values: np.ndarray, tol: float) -> np.ndarray:
    """Single-linkage group number of each value: order-free, ties within ``tol`` share a number."""
    order = np.argsort(values, kind="stable")
    gaps = np.diff(values[order]) > tol
    groups = np.empty(len(values), dtype=np.int64)
    groups[order] = np.concatenate([[0], np.cumsum(gaps)])
    return groups


def tolerant_order(rows: np.ndarray, tol: float) -> np.ndarray:
    """Permutation that sorts rows [n, d] lexicographically, columns compared with tolerance."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    r64 = np.asarray(rows, dtype=np.float64)
    keys = [_column_groups(r64[:, c], tol) for c in range(r64.shape[1])]
    # last resort for rows tied in every column: their own values (differences are below tol)
    return np.lexsort([*r64.T[::-1], *keys[::-1]])


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """The column assigned to each row [n] minimising the total of a square ``cost`` [n, n]: the
    Hungarian algorithm with potentials, O(n³), vectorised over columns. numpy only, as the
    serving path (``MoleculeModel.decode`` verifies every decode with ``orbit_distance``) has no
    scipy; for a 9 x 9 cost it takes about 0.5 ms."""
    c = np.asarray(cost, dtype=np.float64)
    n = len(c)
    if c.shape != (n, n):
        raise ValueError(f"expected a square cost matrix, got {list(c.shape)}")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j]: row (1-based) holding column j; 0 free
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        best = np.full(n + 1, np.inf)  # least reduced cost to reach each column
        via = np.zeros(n + 1, dtype=np.int64)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (reduced < best[1:])
            best[1:][better] = reduced[better]
            via[1:][better] = j0
            j1 = 1 + int(np.argmin(np.where(used[1:], np.inf, best[1:])))
            delta = best[j1]
            u[owner[used]] += delta
            v[used] -= delta
            best[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # augment along the path found
            j1 = via[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.zeros(n, dtype=np.int64)
    cols[owner[1:] - 1] = np.arange(n)
    return cols


def orbit_distance(a: np.ndarray, b: np.ndarray) -> float:
    """min over permutations P of ‖a − P b‖ for row sets a, b [n, d] (Hungarian assignment)."""
    cost = ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    cols = min_cost_assignment(cost)
    return float(np.sqrt(max(cost[np.arange(len(cost)), cols].sum(), 0.0)))


@dataclass
class SortedProjectionHead:
    """The projections of one molecule model; parameters stored in ``projection.json``.

    Lifecycle:
    1. built at training time from the model's size (``max_atoms``, ``dim``, ``latent_bound``);
    2. ``save(path)`` / ``load(path)`` (no randomness: nothing is drawn);
    3. ``apply(name, z, mask)`` projects a batch of padded latents;
    4. ``unflatten(values)`` turns ``sorted`` (or ``raw``) embeddings back into latents + masks
       for the decoder.
    """

    max_atoms: int
    dim: int
    latent_bound: float = 1.0
    pad_value: float = 1.25
    tol: float = 1e-4
    # Names of leading sort-key columns of the latents given to ``apply`` (e.g. the atom-type
    # coordinates of featurize.type_coordinates): ``sorted`` orders rows by them first, and no
    # projection outputs them. Every output is built from the last ``dim`` (learned) columns.
    key: tuple[str, ...] = ()
    padding: str = "marker"  # PADDINGS
    # Rounds of the "colour" sort key (featurize.colour_ranks): at least the encoder's layers.
    colour_rounds: int = 0

    def __post_init__(self) -> None:
        if not self.pad_value > self.latent_bound:
            raise ValueError(
                f"pad_value {self.pad_value} must exceed latent_bound {self.latent_bound}"
            )
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SortedProjectionHead:
        raw = json.loads(Path(path).read_text())
        raw.pop("kind", None)
        raw["key"] = tuple(raw.get("key", ()))
        raw.setdefault("padding", "fill")  # written before paddings had names (qm9-vae <= 1.2.0)
        return cls(**raw)

    def to_json(self) -> dict:
        """What ``save`` writes, without the default of a field that older files lack."""
        out = {"kind": "sorted_node_latents", **asdict(self)}
        if not self.colour_rounds:
            out.pop("colour_rounds")
        return out

    def names(self) -> list[str]:
        return [p.name for p in self.describe()]

    def padding_row(self, width: int | None = None) -> np.ndarray:
        """The row written for a missing atom, ``width`` values (default ``dim``; sort-key
        columns first): "marker" = ``pad_value`` in every sort-key column and in the first latent
        column, 0 in the others; "fill" = ``pad_value`` everywhere."""
        width = self.dim if width is None else width
        if width < self.dim:
            raise ValueError(f"rows have at least the {self.dim} latent columns, got {width}")
        row = np.full(width, self.pad_value, dtype=np.float32)
        if self.padding == "marker":
            row[width - self.dim + 1 :] = 0
        return row

    def _key_text(self) -> list[str]:
        return [
            f"{self.colour_rounds}-round Weisfeiler-Leman colour" if k == "colour" else k
            for k in self.key
        ]

    def _padding_text(self) -> str:
        if self.padding == "fill":
            return f"{self.pad_value:g}"
        return f"{self.pad_value:g} in the row's first value, 0 in the others"

    def describe(self) -> list[ProjectionInfo]:
        n, d = self.max_atoms, self.dim
        if self.padding == "fill":
            pad = f"are all {self.pad_value:g}"
        else:
            pad = (
                f"are padding rows ({self.pad_value:g}{', 0' * (d - 1)}): a first value above the "
                f"latent bound {self.latent_bound:g} marks them"
            )
        layout = (
            f"Layout: {n} rows x {d}, row-major; rows beyond the molecule's atom count {pad}; "
            f"real values satisfy |z| < {self.latent_bound:g}."
        )
        # Every projection is compared with L2, by measurement: the 10 nearest QM9 test molecules
        # by L2 had the HOMO-LUMO gaps closest to the query's (python -m
        # quotient_models.molecules.evaluate neighbours); no projection is normalised.
        return [
            ProjectionInfo(
                "sorted",
                n * d,
                True,
                "Per-atom latents in lexicographic row order"
                + (f" of (atom {', '.join(self._key_text())}, latent)" if self.key else "")
                + f" (ties within {self.tol:g} per column): a lossless cross-section that "
                "decodes back to the molecule"
                + ("; isometric (d = 1)" if d == 1 and not self.key else "")
                + f". {layout}",
                metric="l2",
            ),
            ProjectionInfo(
                "sum", d, True, f"Sum of the {d}-dimensional atom latents (lossy).", metric="l2"
            ),
            ProjectionInfo(
                "mean", d, True, f"Mean of the {d}-dimensional atom latents (lossy).", metric="l2"
            ),
            ProjectionInfo(
                "raw",
                n * d,
                False,
                "Per-atom latents in the input's atom order, NOT invariant: renumbering the "
                f"atoms permutes the rows. For analysis only. {layout}",
                metric="l2",
            ),
        ]

    def _check(
        self, z: np.ndarray, mask: np.ndarray, width: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(z, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        width = z.shape[-1] if width is None else width
        if z.ndim != 3 or z.shape[1:] != (self.max_atoms, width) or mask.shape != z.shape[:2]:
            raise ValueError(
                f"expected z [B, {self.max_atoms}, {width}] and mask [B, {self.max_atoms}], "
                f"got {list(z.shape)} and {list(mask.shape)}"
            )
        return z, mask

    def padded(self, z: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """z (rows of ``dim`` or more values, sort-key columns first) with the rows that are not
        atoms replaced by ``padding_row`` (input order)."""
        z, mask = self._check(z, mask)
        return np.where(mask[..., None], z, self.padding_row(z.shape[-1]))

    def sort(self, z: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded rows (of any width) in tolerance-grouped lexicographic order [B, N, w], and the
        permutations used [B, N]."""
        zp = self.padded(z, mask)
        perms = np.stack([tolerant_order(row, self.tol) for row in zp])
        return np.take_along_axis(zp, perms[..., None], axis=1), perms

    def apply(self, name: str, z: np.ndarray, mask: np.ndarray) -> ProjectionOutput:
        """z [B, N, len(key) + dim] (key columns first), mask [B, N] → the projection."""
        k = len(self.key)
        z, mask = self._check(z, mask, k + self.dim)
        b = len(z)
        if name == "sorted":
            return ProjectionOutput(self.sort(z, mask)[0][..., k:].reshape(b, -1))
        z = z[..., k:]
        if name in ("sum", "mean"):
            total = (z.astype(np.float64) * mask[..., None]).sum(axis=1)
            if name == "mean":
                total /= np.maximum(mask.sum(axis=1, keepdims=True), 1)
            return ProjectionOutput(total.astype(np.float32))
        if name == "raw":
            return ProjectionOutput(self.padded(z, mask).reshape(b, -1))
        raise KeyError(f"unknown projection {name!r}; known: {', '.join(self.names())}")

    def unflatten(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sorted`` or ``raw`` embeddings [B, N*d] → latents [B, N, d] and masks [B, N].

        A row is padding when every value that marks padding (``padding_row``'s nonzero ones:
        the first for "marker", all for "fill") is nearer pad_value than latent_bound."""
        v = np.asarray(values, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.max_atoms * self.dim:
            raise ValueError(
                f"expected embeddings [B, {self.max_atoms * self.dim}], got {list(v.shape)}"
            )
        z = v.reshape(len(v), self.max_atoms, self.dim)
        midpoint = (self.pad_value + self.latent_bound) / 2
        marks = self.padding_row() != 0
        mask = ~(z[..., marks] > midpoint).all(axis=-1)
        return np.where(mask[..., None], z, 0).astype(np.float32), mask

    def embedding_error(self, values: np.ndarray) -> str | None:
        """Why one flattened ``sorted``/``raw`` embedding [N*d] is not one this head produces, or
        None. Every row must be a latent row (each |value| <= latent_bound) or a padding row (each
        value within (pad_value - latent_bound) / 2 of ``padding_row``'s), padding rows last; a
        value that is neither, or not finite, a row that mixes the two, or an atom after padding,
        is named by its row and column."""
        z = np.asarray(values, dtype=np.float64).reshape(self.max_atoms, self.dim)
        latent = np.abs(z) <= self.latent_bound
        pad = self.padding_row().astype(np.float64)
        padding = np.abs(z - pad) <= (self.pad_value - self.latent_bound) / 2
        first_padding = None
        for r in range(self.max_atoms):
            where = f"row {r} (values {r * self.dim}..{(r + 1) * self.dim - 1})"
            if padding[r].all():
                first_padding = r if first_padding is None else first_padding
                continue
            if latent[r].all():
                if first_padding is not None:
                    return (
                        f"{where} is an atom after padding row {first_padding}: padding rows "
                        "come last"
                    )
                continue
            odd = np.flatnonzero(~latent[r] & ~padding[r])
            if len(odd):
                c = int(odd[0])
                return (
                    f"{where}, column {c}: {z[r, c]:g} is neither a latent value (|z| <= "
                    f"{self.latent_bound:g}) nor padding ({self._padding_text()})"
                )
            return f"{where} mixes padding ({self._padding_text()}) with latent values"
        return None
