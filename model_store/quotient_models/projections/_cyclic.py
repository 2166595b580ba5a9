"""Projections of C_N-equivariant latents made of regular fields (Hansen et al., ICML 2024, case 2).

A latent z has shape [B, C, N]: C fields, each a vector over the N rotations of the group C_N.
Rotating the input by 360/N degrees rolls every field by the same step (``rotation_shift``,
+1 or -1, a property of the trained model): ρ(g_k) z = roll(z, k * rotation_shift, axis=-1).

- ``align``: alignment to a fixed random reference r, a cross-section of the orbit: output
  roll(z, s*) with s* = argmax_s <roll(z, s), r>; s* also gives the pose.
- ``maxfilter``: random max filtering, (max_s <roll(z, s), t_i>)_i for K random templates.
- ``mean`` / ``max``: group pooling over the N entries of each field (the lossy baseline).
- ``raw``: the equivariant latent itself, NOT invariant, for analysis only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quotient_models.projections._types import ProjectionInfo, ProjectionOutput

__all__ = ["CyclicProjectionHead", "align", "group_max", "group_mean", "max_filter"]


def _orbit(z: np.ndarray) -> np.ndarray:
    """All N cyclic shifts of z [B, C, N] → [B, N, C, N], shift s at index s."""
    n = z.shape[-1]
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # idx[s, j] = j - s
    return z[:, :, idx].transpose(0, 2, 1, 3)


def _shift_scores(z: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """<roll(z, s), t_k> for every shift s and template k → [B, N, K] (float64)."""
    orbit = _orbit(z.astype(np.float64))
    return np.einsum("bscn,kcn->bsk", orbit, templates.astype(np.float64))


def align(z: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roll every latent of z [B, C, N] to the shift that best matches reference [C, N].

    Returns the aligned latents [B, C, N] (each on its input's orbit) and the chosen shifts [B].
    Exact ties (a latent that is itself shift-symmetric) give the same output whichever wins,
    but not the same shift: float noise decides it, so the pose of a symmetric input is one of
    its equally good poses, not a fixed one.
    """
    scores = _shift_scores(z, reference[None])[:, :, 0]
    shifts = scores.argmax(axis=1)
    aligned = _orbit(z)[np.arange(z.shape[0]), shifts]
    return aligned, shifts


def max_filter(z: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Random max filtering: max_s <roll(z, s), t_k> for templates [K, C, N] → [B, K]."""
    return _shift_scores(z, templates).max(axis=1)


def group_mean(z: np.ndarray) -> np.ndarray:
    """Mean over the group axis: [B, C, N] → [B, C]."""
    return z.mean(axis=-1)


def group_max(z: np.ndarray) -> np.ndarray:
    """Max over the group axis: [B, C, N] → [B, C]."""
    return z.max(axis=-1)


@dataclass
class CyclicProjectionHead:
    """The projections of one model, with its seeded references stored beside the weights.

    Lifecycle:
    1. ``create(fields, order, seed, ...)`` draws the reference and templates once (training time);
    2. ``save(path)`` stores them in an ``.npz`` next to the encoder;
    3. ``load(path)`` restores them at serving time (no randomness at serving time);
    4. ``apply(name, z)`` projects a batch of latents.
    """

    fields: int
    order: int
    seed: int
    reference: np.ndarray  # [C, N]
    templates: np.ndarray  # [K, C, N]
    rotation_shift: int = 1

    @classmethod
    def create(
        cls,
        fields: int,
        order: int,
        seed: int,
        n_templates: int | None = None,
        rotation_shift: int = 1,
    ) -> CyclicProjectionHead:
        if rotation_shift not in (1, -1):
            raise ValueError(f"rotation_shift must be +1 or -1, got {rotation_shift}")
        rng = np.random.default_rng(seed)
        k = n_templates or fields * order
        reference = rng.standard_normal((fields, order)).astype(np.float32)
        templates = rng.standard_normal((k, fields, order)).astype(np.float32)
        return cls(fields, order, seed, reference, templates, rotation_shift)

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            fields=self.fields,
            order=self.order,
            seed=self.seed,
            reference=self.reference,
            templates=self.templates,
            rotation_shift=self.rotation_shift,
        )

    @classmethod
    def load(cls, path: str | Path) -> CyclicProjectionHead:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                fields=int(f["fields"]),
                order=int(f["order"]),
                seed=int(f["seed"]),
                reference=f["reference"].astype(np.float32),
                templates=f["templates"].astype(np.float32),
                rotation_shift=int(f["rotation_shift"]),
            )

    def names(self) -> list[str]:
        return [p.name for p in self.describe()]

    def describe(self) -> list[ProjectionInfo]:
        c, n, k = self.fields, self.order, len(self.templates)
        step = 360 / n
        # Each projection's distance: the one with the higher 10-NN label agreement of rotated
        # MNIST digits, L2 against cosine, averaged over two galleries, L2 unless cosine leads by
        # more than 0.005 (``python -m quotient_models.images.neighbours`` prints the choice).
        # For rotmnist-c8 the two differ by less than 0.005 everywhere: L2 throughout.
        return [
            ProjectionInfo(
                "align",
                c * n,
                True,
                f"Latent rolled to the shift that best matches a fixed random reference "
                f"(a cross-section of the C{n} orbit; nearly lossless). Layout: {c} fields x {n}.",
                returns_pose=True,
                metric="l2",
            ),
            ProjectionInfo(
                "maxfilter",
                k,
                True,
                f"Random max filtering: for each of {k} fixed random templates, the largest "
                f"inner product over the {n} rotations of the latent.",
                metric="l2",
            ),
            ProjectionInfo(
                "mean", c, True, f"Mean of each of the {c} fields over the group.", metric="l2"
            ),
            ProjectionInfo(
                "max", c, True, f"Max of each of the {c} fields over the group.", metric="l2"
            ),
            ProjectionInfo(
                "raw",
                c * n,
                False,
                f"The equivariant latent itself, NOT invariant: rotating the input by "
                f"{step:g} degrees rolls each field. For analysis only. Layout: {c} fields x {n}.",
                metric="l2",
            ),
        ]

    def _as_fields(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 2:
            z = z.reshape(z.shape[0], self.fields, self.order)
        if z.shape[1:] != (self.fields, self.order):
            raise ValueError(f"latent shape {z.shape} does not match {self.fields}x{self.order}")
        return z

    def pose_degrees(self, shifts: np.ndarray) -> np.ndarray:
        """Orientation (CCW degrees) from the aligning shift: rotating the input by one group step
        rolls the latent by ``rotation_shift``, which lowers the aligning shift by the same."""
        step = 360.0 / self.order
        return np.mod(-shifts * self.rotation_shift * step, 360.0).astype(np.float64)

    def apply(self, name: str, z: np.ndarray) -> ProjectionOutput:
        zf = self._as_fields(z)
        b = zf.shape[0]
        if name == "align":
            aligned, shifts = align(zf, self.reference)
            return ProjectionOutput(aligned.reshape(b, -1), self.pose_degrees(shifts))
        if name == "maxfilter":
            return ProjectionOutput(max_filter(zf, self.templates).astype(np.float32))
        if name == "mean":
            return ProjectionOutput(group_mean(zf))
        if name == "max":
            return ProjectionOutput(group_max(zf))
        if name == "raw":
            return ProjectionOutput(zf.reshape(b, -1).copy())
        raise KeyError(f"unknown projection {name!r}; known: {', '.join(self.names())}")
