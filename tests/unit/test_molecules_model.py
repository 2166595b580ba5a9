"""qm9_vae_v1 and the served molecule model: PyG form == dense/exported form, equivariance,
invariance of the default embedding under many renumberings (symmetric molecules included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")
import torch
from rdkit import Chem

from quotient_models.invariance import relative_change
from quotient_models.molecules.arch_qm9_vae_v1 import GraphVAE, VAEConfig
from quotient_models.molecules.featurize import DecodedMolecule, collate_graphs, featurize
from quotient_models.molecules.model import (
    DECODE_TOLERANCE,
    MoleculeModel,
    connect_fragments,
    load_molecule_model,
)
from quotient_models.molecules.testing import QM9_DOMAIN, write_tiny_molecule_model
from quotient_models.molecules.train import to_pyg

SMILES = [
    "c1ccccc1",
    "CC(C)(C)C",
    "CCCC",
    "C1COCCO1",
    "c1cc[nH]c1",
    "[NH3+]CC([O-])=O",
    "OC1C2CC1N2",
    "N#CC(O)C=O",
]


@pytest.fixture(scope="module")
def vae() -> GraphVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        n_elements=4,
        n_charges=3,
        n_hydrogens=5,
        n_slots=9,
        latent_dim=4,
        hidden=32,
        enc_layers=2,
        dec_layers=2,
        heads=2,
    )
    return GraphVAE(cfg).eval()


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return collate_graphs([featurize(s, QM9_DOMAIN) for s in SMILES], QM9_DOMAIN)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_molecule_model(tmp_path_factory.mktemp("tiny-qm9"))


def test_pyg_and_dense_encoders_agree(vae: GraphVAE, arrays: dict[str, np.ndarray]) -> None:
    atoms, bonds = torch.from_numpy(arrays["atoms"]), torch.from_numpy(arrays["bonds"])
    x, edge_index, codes, batch, mask = to_pyg(atoms, bonds)
    with torch.no_grad():
        mu_sparse, _ = vae.encoder(x, edge_index, codes, batch)
        mu_dense, _ = vae.encoder.forward_dense(atoms, bonds)
    torch.testing.assert_close(mu_dense[mask], mu_sparse, atol=1e-5, rtol=1e-5)
    assert (mu_dense[~mask] == 0).all()


def test_encoder_and_decoder_are_equivariant(vae: GraphVAE, arrays: dict[str, np.ndarray]) -> None:
    atoms, bonds = torch.from_numpy(arrays["atoms"]), torch.from_numpy(arrays["bonds"])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(9))
    with torch.no_grad():
        mu, _ = vae.encoder.forward_dense(atoms, bonds)
        mu_p, _ = vae.encoder.forward_dense(atoms[:, perm], bonds[:, perm][:, :, perm])
        torch.testing.assert_close(mu_p, mu[:, perm], atol=1e-5, rtol=1e-5)
        mask = atoms[..., 0] >= 0
        out = vae.decoder(mu, mask)
        out_p = vae.decoder(mu[:, perm], mask[:, perm])
    for a, b in zip(out[:3], out_p[:3], strict=True):
        torch.testing.assert_close(
            b[mask[:, perm]], a[:, perm][mask[:, perm]], atol=1e-4, rtol=1e-4
        )
    pair = mask[:, perm].unsqueeze(1) & mask[:, perm].unsqueeze(2)
    torch.testing.assert_close(
        out_p[3][pair], out[3][:, perm][:, :, perm][pair], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(out[3], out[3].transpose(1, 2))  # bond logits are symmetric


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_exported_model_matches_pytorch(model_dir: Path, engine: str) -> None:
    model = load_molecule_model(model_dir, engine)
    ckpt = torch.load(model_dir / "checkpoint.pt", weights_only=False)
    vae = GraphVAE(VAEConfig(**ckpt["config"])).eval()
    vae.load_state_dict(ckpt["state_dict"])
    arrays = model.collate_graphs([model.graph(s) for s in SMILES])
    z, _ = model.latent(arrays)
    with torch.no_grad():
        ref = vae.encoder.forward_dense(
            torch.from_numpy(arrays["atoms"]), torch.from_numpy(arrays["bonds"])
        )[0]
    np.testing.assert_allclose(z[..., model.n_type :], ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("smiles", SMILES)
def test_default_embedding_is_invariant_under_many_renumberings(
    model_dir: Path, smiles: str
) -> None:
    model = load_molecule_model(model_dir, "onnx")
    mol = Chem.MolFromSmiles(smiles)
    rng = np.random.default_rng(1)
    variants = [
        Chem.MolToSmiles(
            Chem.RenumberAtoms(mol, rng.permutation(mol.GetNumAtoms()).tolist()), canonical=False
        )
        for _ in range(50)
    ]
    base = model.embed_smiles([smiles] * len(variants)).values
    out = model.embed_smiles(variants).values
    assert relative_change(base, out).max() <= 1e-5
    for name in ("sum", "mean"):
        assert (
            relative_change(
                model.embed_smiles([smiles] * 50, name).values,
                model.embed_smiles(variants, name).values,
            ).max()
            <= 1e-5
        )


def test_sorted_and_raw_decode_identically(model_dir: Path) -> None:
    model = load_molecule_model(model_dir, "onnx")
    sorted_out = model.decode(model.embed_smiles(SMILES).values)
    raw_out = model.decode(model.embed_smiles(SMILES, "raw").values)
    # untrained: mostly invalid; the same molecules (reasons name atoms by row, so they may differ)
    assert [d.smiles for d in sorted_out] == [d.smiles for d in raw_out]
    assert all(d.smiles is not None or d.reason for d in sorted_out)


def test_decoding_is_canonical_in_the_row_order(model_dir: Path) -> None:
    """Any row order of the same latent reaches the decoder bit-identically (decode sorts first),
    so sorted/raw agreement cannot hinge on float noise at an argmax near-tie."""
    model = load_molecule_model(model_dir, "onnx")
    z, mask = model.latent(model.collate_graphs([model.graph(s) for s in SMILES]))
    expected = [
        (d.smiles, d.reason) for d in model.decode(model.head.apply("sorted", z, mask).values)
    ]
    rng = np.random.default_rng(0)
    n = mask.sum(axis=1)
    for _ in range(20):
        perm = np.stack([np.r_[rng.permutation(k), np.arange(k, mask.shape[1])] for k in n])
        zp = np.take_along_axis(z, perm[..., None], axis=1)
        mp = np.take_along_axis(mask, perm, axis=1)
        got = model.decode(model.head.apply("raw", zp, mp).values)
        assert [(d.smiles, d.reason) for d in got] == expected
    # the logits themselves: a near-tie is broken the same way for every order
    zs, order = model.head.sort(z, mask)
    again, order2 = model.head.sort(zs, np.take_along_axis(mask, order, axis=1))
    np.testing.assert_array_equal(again, zs)  # sorting is idempotent, bit for bit
    np.testing.assert_array_equal(order2, np.arange(mask.shape[1])[None].repeat(len(z), 0))


def test_verify_keeps_only_molecules_that_embed_back(model_dir: Path) -> None:
    """Independent of the (untrained) decoder: a decode is kept when its molecule embeds to the
    rows it came from, in any row order, and refused with the distance otherwise."""
    model = load_molecule_model(model_dir, "onnx")
    z, mask = model.head.unflatten(model.embed_smiles(["CCO", "CCO", "CCN"]).values)
    raw = model.head.unflatten(model.embed_smiles(["OCC"], "raw").values)
    z, mask = np.concatenate([z, raw[0]]), np.concatenate([mask, raw[1]])
    claims = [
        DecodedMolecule("CCO"),
        DecodedMolecule("CCN"),
        DecodedMolecule("CCN"),
        DecodedMolecule("CCO"),
    ]
    got = model.verify(z, mask, claims)
    assert [d.smiles for d in got] == ["CCO", None, "CCN", "CCO"]
    assert got[0].distance is not None and got[0].distance <= 1e-5
    assert got[3].distance is not None and got[3].distance <= 1e-5  # raw rows, any order
    assert got[1].distance is not None and got[1].distance > DECODE_TOLERANCE
    assert got[1].reason == (
        f"decoded CCN re-embeds {got[1].distance:.3g} away from this embedding (tolerance "
        f"{DECODE_TOLERANCE:g}): the decoder does not reconstruct this embedding's molecule, if "
        "it has one"
    )
    inexact = model.verify(z, mask, claims, allow_inexact=True)
    assert [d.smiles for d in inexact] == ["CCO", "CCN", "CCN", "CCO"]
    assert inexact[1].distance == got[1].distance and inexact[1].reason is None
    # no molecule: nothing re-embedded; one the model cannot embed: the reason says why
    none, radical = model.verify(
        z[:2], mask[:2], [DecodedMolecule(None, "why"), DecodedMolecule("[CH2]O")]
    )
    assert none == DecodedMolecule(None, "why")
    assert radical.smiles is None and radical.distance is None
    assert (
        radical.reason is not None
        and "decoded [CH2]O is no molecule this model embeds" in radical.reason
    )


def test_fragments_are_joined_by_their_most_probable_bond() -> None:
    logits = np.zeros((3, 3, 5))
    logits[..., 0] = 5.0  # "none" everywhere, least so between atoms 0 and 2 (a double bond)
    logits[0, 2] = logits[2, 0] = [1.0, 0.0, 0.5, 0.0, 0.0]
    logits[0, 1] = logits[1, 0] = [0.0, 3.0, 0.0, 0.0, 0.0]  # bonded in the argmax graph
    bonds = logits.argmax(-1)
    np.fill_diagonal(bonds, 0)
    joined = connect_fragments(bonds, logits)
    assert joined.tolist() == [[0, 1, 2], [1, 0, 0], [2, 0, 0]]
    assert connect_fragments(joined, logits) is joined  # connected already: unchanged


def test_model_contract(model_dir: Path) -> None:
    from quotient_models.runtime import InputLimits

    model = load_molecule_model(model_dir, "onnx")
    assert isinstance(model, MoleculeModel)
    assert model.spec.modality == "molecule" and model.spec.default_projection == "sorted"
    items = [model.prepare(s.encode(), InputLimits()) for s in ("CCO", "c1ccccc1")]
    assert [model.item_cost(i) for i in items] == [3, 6]
    out = model.embed_batch(model.collate(items))
    assert out.values.shape == (2, 9 * 4) and out.values.dtype == np.float32
    assert [p.name for p in model.projections()] == ["sorted", "sum", "mean", "raw"]
    from quotient_models.errors import InputError

    with pytest.raises(InputError, match="not valid UTF-8"):
        model.prepare(b"\xff\xfe", InputLimits())
    with pytest.raises(InputError, match="exceeds the limit"):
        model.prepare(b"C" * 100, InputLimits(max_input_bytes=10))


def test_neighbour_figures_of_every_projection_padding_and_metric(model_dir: Path) -> None:
    """``evaluate neighbours`` on pairs of renumberings of a molecule: one row per (projection,
    padding, metric), the served ones flagged, and under every invariant projection each copy's
    nearest neighbour is its twin (same property, an ECFP4 neighbour, same atom count)."""
    from quotient_models.molecules.neighbours import neighbour_quality

    rng = np.random.default_rng(0)
    smiles, pair = [], []
    for k, s in enumerate(SMILES):
        mol = Chem.MolFromSmiles(s)
        order = [int(i) for i in rng.permutation(mol.GetNumAtoms())]
        smiles += [s, Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False)]
        pair += [k, k]
    model = load_molecule_model(model_dir, "onnx")
    z, mask = model.latent(model.collate([model.item(model.graph(s)) for s in smiles]))
    canonical = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in smiles]
    pairs = np.array(pair, dtype=np.float64)
    m = neighbour_quality(model, z, mask, canonical, {"gap": pairs, "alpha": pairs}, k=1)
    rows = {(r["feature"], r["padding"], r["metric"]): r for r in m["rows"]}
    assert len(rows) == 4 * 2 + 2 * 2  # sorted and raw also with the fill padding
    assert {key for key, r in rows.items() if r["served"]} == {
        (f, "marker", "l2") for f in ("sorted", "raw", "sum", "mean")
    }
    for (feature, padding, metric), r in rows.items():
        if feature != "raw":
            got = (r["mean_abs_diff_gap"], r["ecfp4_overlap"], r["same_atom_count"])
            assert got == (0.0, 1.0, 1.0), (feature, padding, metric)
    assert m["molecules"] == len(smiles) and m["references"]["ecfp4"]["ecfp4_overlap"] is None
