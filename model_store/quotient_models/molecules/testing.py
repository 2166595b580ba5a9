"""A tiny, untrained molecule model directory for tests of the serving stack (figures meaningless).

Its encoder and decoder are random but exactly as equivariant as a trained one, so invariance,
padding, decoding plumbing and input errors can be tested without QM9 or a training run.
"""

from __future__ import annotations

from pathlib import Path

from quotient_models.molecules.featurize import MoleculeDomain

__all__ = ["QM9_DOMAIN", "write_tiny_molecule_model"]

QM9_DOMAIN = MoleculeDomain(
    max_atoms=9, elements=("C", "N", "O", "F"), charges=(-1, 0, 1), max_hydrogens=4
)


def write_tiny_molecule_model(
    directory: str | Path, latent_dim: int = 4, seed: int = 0, domain: MoleculeDomain = QM9_DOMAIN
) -> Path:
    import torch

    from quotient_models.molecules.arch_qm9_vae_v1 import GraphVAE, VAEConfig
    from quotient_models.molecules.train import export

    torch.manual_seed(seed)
    cfg = VAEConfig(
        n_elements=len(domain.elements),
        n_charges=len(domain.charges),
        n_hydrogens=domain.max_hydrogens + 1,
        n_slots=domain.symmetry_slots,
        latent_dim=latent_dim,
        hidden=32,
        enc_layers=2,
        dec_layers=1,
        heads=2,
    )
    info = {"epochs": 0, "note": "untrained test model"}
    return export(GraphVAE(cfg), domain, Path(directory), info, {"note": "no data"})
