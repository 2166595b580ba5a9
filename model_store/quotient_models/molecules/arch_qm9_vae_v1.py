"""qm9_vae_v1: a permutation-equivariant graph VAE with one latent vector per heavy atom.

Frozen: trained weights are bound to this code; a changed architecture is a new module (v2).

Encoder (message passing, PyTorch Geometric for training): atom embedding (element + charge +
hydrogens + symmetry slot) → L edge-conditioned layers,
    m_ij = W_2 SiLU(W_i h_i + W_j h_j + W_e e_ij),
    h_i ← LayerNorm(h_i + MLP([h_i, Σ_j∈N(i) m_ij, mean_k h_k]))
→ per-atom mean μ_i = b·tanh(W h_i) (|μ| < b = ``latent_bound``, so padding rows can be told
apart) and log-variance. ``forward_dense`` computes exactly the same function on dense padded
tensors with the same parameters, without PyG: that is what is exported (ONNX / TorchScript).

Decoder (dense, equivariant, no graph input): z [B, N, d] → Linear → L self-attention blocks with
padding masks and no positional information → per-atom logits (element, charge, hydrogens) and
per-pair bond logits from the symmetric features A h_i + A h_j + (P h_i) ⊙ (P h_j). Permuting the
rows of z permutes every output the same way, so a sorted latent decodes to the same molecule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ARCHITECTURE", "DenseDecoder", "DenseEncoder", "GraphVAE", "VAEConfig"]

ARCHITECTURE = "qm9_vae_v1"
N_BOND_TYPES = 5  # none, single, double, triple, aromatic


@dataclass(frozen=True)
class VAEConfig:
    n_elements: int
    n_charges: int
    n_hydrogens: int  # max_hydrogens + 1
    n_slots: int  # symmetry slots (= max atoms)
    latent_dim: int = 8
    hidden: int = 128
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 4
    latent_bound: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out))


class _Message(nn.Module):
    """First message layer split by input, W[h_i; h_j; e] = W_i h_i + W_j h_j + W_e e (W_e e is an
    embedding of the bond code), so that it costs per atom, not per pair; then SiLU and W_2."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w_i = nn.Linear(hidden, hidden)
        self.w_j = nn.Linear(hidden, hidden, bias=False)
        self.w_e = nn.Embedding(N_BOND_TYPES, hidden)
        self.w_2 = nn.Linear(hidden, hidden)


def _edge_conv_class() -> type:
    from torch_geometric.nn import MessagePassing

    class EdgeConv(MessagePassing):
        """The PyG form of one encoder layer (sum aggregation over bonded neighbours)."""

        def __init__(self, hidden: int) -> None:
            super().__init__(aggr="add")
            self.msg = _Message(hidden)
            self.update_mlp = _mlp(3 * hidden, hidden, hidden)
            self.norm = nn.LayerNorm(hidden)

        def forward(self, h: Tensor, edge_index: Tensor, codes: Tensor, ctx: Tensor) -> Tensor:
            agg = self.propagate(
                edge_index, a=self.msg.w_i(h), b=self.msg.w_j(h), e=self.msg.w_e(codes)
            )
            return self.norm(h + self.update_mlp(torch.cat([h, agg, ctx], dim=-1)))

        def message(self, a_i: Tensor, b_j: Tensor, e: Tensor) -> Tensor:
            return self.msg.w_2(F.silu(a_i + b_j + e))

        def forward_dense(self, h: Tensor, bonds: Tensor, adj: Tensor, ctx: Tensor) -> Tensor:
            pre = self.msg.w_i(h).unsqueeze(2) + self.msg.w_j(h).unsqueeze(1) + self.msg.w_e(bonds)
            m = self.msg.w_2(F.silu(pre)) * adj.unsqueeze(-1)  # [B, N(i), N(j), H]
            agg = m.sum(dim=2)
            return self.norm(h + self.update_mlp(torch.cat([h, agg, ctx], dim=-1)))

    return EdgeConv


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.element = nn.Embedding(cfg.n_elements, h)
        self.charge = nn.Embedding(cfg.n_charges, h)
        self.hydrogens = nn.Embedding(cfg.n_hydrogens, h)
        self.slot = nn.Embedding(cfg.n_slots, h)
        edge_conv = _edge_conv_class()
        self.layers = nn.ModuleList([edge_conv(h) for _ in range(cfg.enc_layers)])
        self.ctx = nn.ModuleList([nn.Linear(h, h) for _ in range(cfg.enc_layers)])
        self.mu = nn.Linear(h, cfg.latent_dim)
        self.logvar = nn.Linear(h, cfg.latent_dim)

    def embed_atoms(self, atoms: Tensor) -> Tensor:
        a = atoms.clamp(min=0)
        return (
            self.element(a[..., 0])
            + self.charge(a[..., 1])
            + self.hydrogens(a[..., 2])
            + self.slot(a[..., 3])
        )

    def head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.cfg.latent_bound * torch.tanh(self.mu(h)), self.logvar(h).clamp(-12.0, 4.0)

    def forward(
        self, atoms: Tensor, edge_index: Tensor, bond_codes: Tensor, batch: Tensor
    ) -> tuple[Tensor, Tensor]:
        """PyG form: atoms [n, 4], edge_index [2, E] (both directions), bond_codes [E],
        batch [n]."""
        from torch_geometric.utils import scatter

        h = self.embed_atoms(atoms)
        for layer, ctx in zip(self.layers, self.ctx, strict=True):
            mean = scatter(h, batch, dim=0, reduce="mean")[batch]
            h = layer(h, edge_index, bond_codes, ctx(mean))
        return self.head(h)

    def forward_dense(self, atoms: Tensor, bonds: Tensor) -> tuple[Tensor, Tensor]:
        """Dense form: atoms [B, N, 4] (-1 rows are padding), bonds [B, N, N] codes
        → [B, N, d] x2."""
        mask = (atoms[..., 0] >= 0).to(torch.float32).unsqueeze(-1)  # [B, N, 1]
        adj = (bonds > 0).to(torch.float32)
        h = self.embed_atoms(atoms) * mask
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        for layer, ctx in zip(self.layers, self.ctx, strict=True):
            mean = (h * mask).sum(dim=1, keepdim=True) / count
            h = layer.forward_dense(h, bonds, adj, ctx(mean).expand_as(h)) * mask  # type: ignore[operator]
        mu, logvar = self.head(h)
        return mu * mask, logvar * mask


class AttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.ff = _mlp(hidden, 2 * hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, h: Tensor, key_bias: Tensor) -> Tensor:
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5 + key_bias  # [B, H, N, N]
        att = torch.softmax(scores, dim=-1) @ v  # [B, H, N, c/H]
        h = self.norm1(h + self.out(att.transpose(1, 2).reshape(b, n, c)))
        return self.norm2(h + self.ff(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.inp = _mlp(cfg.latent_dim, h, h)
        self.blocks = nn.ModuleList([AttentionBlock(h, cfg.heads) for _ in range(cfg.dec_layers)])
        self.element = nn.Linear(h, cfg.n_elements)
        self.charge = nn.Linear(h, cfg.n_charges)
        self.hydrogens = nn.Linear(h, cfg.n_hydrogens)
        self.pair_sum = nn.Linear(h, h)
        self.pair_prod = nn.Linear(h, h, bias=False)
        self.pair_out = nn.Linear(h, N_BOND_TYPES)

    def forward(self, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z [B, N, d], mask [B, N] → logits: element, charge, hydrogens [B, N, *],
        bonds [B, N, N, 5]."""
        m = mask.to(torch.float32)
        key_bias = ((1.0 - m) * -1e9)[:, None, None, :]
        h = self.inp(z * m.unsqueeze(-1))
        for block in self.blocks:
            h = block(h, key_bias)
        # symmetric in (i, j): A h_i + A h_j + (P h_i) * (P h_j), per atom, combined per pair
        s, p = self.pair_sum(h), self.pair_prod(h)
        pre = s.unsqueeze(2) + s.unsqueeze(1) + p.unsqueeze(2) * p.unsqueeze(1)
        bonds = self.pair_out(F.silu(pre))
        return self.element(h), self.charge(h), self.hydrogens(h), bonds


class GraphVAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)


class DenseEncoder(nn.Module):
    """Export wrapper: (atoms [B, N, 4] int64, bonds [B, N, N] int64) → latent μ [B, N, d]."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, atoms: Tensor, bonds: Tensor) -> Tensor:
        return self.encoder.forward_dense(atoms, bonds)[0]


class DenseDecoder(nn.Module):
    """Export wrapper: (z [B, N, d] float32, mask [B, N] bool) → the decoder's four logits."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.decoder(z, mask)
