"""Sorted / pooled projections of node latents (Hansen et al., ICML 2024, case 1): invariance,
ties, lossless."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from quotient_models.invariance import assert_invariant
from quotient_models.molecules.projections import (
    PADDINGS,
    SortedProjectionHead,
    min_cost_assignment,
    orbit_distance,
    tolerant_order,
)

N, D = 9, 4


@pytest.fixture(params=PADDINGS)
def head(request: pytest.FixtureRequest) -> SortedProjectionHead:
    """Both paddings: "marker" (served since qm9-vae 1.3.0) and "fill" (older projection.json)."""
    if request.param == "fill":
        return SortedProjectionHead(max_atoms=N, dim=D, pad_value=2.0, padding="fill")
    return SortedProjectionHead(max_atoms=N, dim=D)


def batch(seed: int = 0, b: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (b, N, D)).astype(np.float32)
    n = rng.integers(1, N + 1, b)
    mask = np.arange(N)[None] < n[:, None]
    return z * mask[..., None], mask


def permuter(seed: int):  # type: ignore[no-untyped-def]
    """A transform of x = concat(z, mask) that permutes the real rows of each item randomly."""

    def transform(x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = x.copy()
        for k in range(len(x)):
            n = int(x[k, :, -1].sum())
            out[k, :n] = x[k, rng.permutation(n)]
        return out

    return transform


def as_fn(head: SortedProjectionHead, name: str):  # type: ignore[no-untyped-def]
    return lambda x: head.apply(name, x[..., :-1], x[..., -1] > 0).values


def packed(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.concatenate([z, mask[..., None].astype(np.float32)], axis=-1)


@pytest.mark.parametrize("name", ["sorted", "sum", "mean"])
def test_invariant_under_renumbering(head: SortedProjectionHead, name: str) -> None:
    x = packed(*batch())
    assert_invariant(as_fn(head, name), x, {f"perm{s}": permuter(s) for s in range(20)}, rtol=1e-6)


def test_raw_is_not_invariant(head: SortedProjectionHead) -> None:
    x = packed(*batch())
    with pytest.raises(AssertionError):
        assert_invariant(as_fn(head, "raw"), x, {"perm": permuter(1)}, rtol=1e-3)


def test_ties_within_tolerance_do_not_change_the_result(head: SortedProjectionHead) -> None:
    """Rows whose first (and second) coordinates differ by float noise but whose later coordinates
    differ a lot: a plain lexicographic sort would flip them between numberings."""
    rng = np.random.default_rng(3)
    rows = np.array(
        [[0.5, 0.2, 0.9, -0.3], [0.5, 0.2, -0.7, 0.1], [0.5, -0.4, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]]
    )
    z = np.zeros((1, N, D), np.float32)
    z[0, :4] = rows
    mask = np.arange(N)[None] < 4
    ref = head.apply("sorted", z, mask).values
    for _ in range(200):
        noisy = z.copy()
        noisy[0, :4] += rng.normal(0, 1e-6, (4, D))
        noisy[0, :4] = noisy[0, rng.permutation(4)]
        out = head.apply("sorted", noisy, mask).values
        assert np.abs(out - ref).max() < 1e-5


def test_symmetric_rows_any_order(head: SortedProjectionHead) -> None:
    """Benzene-like: identical rows up to noise (six carbons) and neopentane-like (four methyls)."""
    rng = np.random.default_rng(4)
    for rows in (
        np.tile([[0.3, -0.2, 0.7, 0.1]], (6, 1)),
        np.vstack([np.tile([[0.1, 0.5, -0.5, 0.2]], (4, 1)), [[0.9, 0, 0, 0]]]),
    ):
        n = len(rows)
        z = np.zeros((1, N, D), np.float32)
        z[0, :n] = rows
        mask = np.arange(N)[None] < n
        ref = head.apply("sorted", z, mask).values
        for _ in range(100):
            noisy = z.copy()
            noisy[0, :n] = (rows + rng.normal(0, 1e-7, rows.shape))[rng.permutation(n)]
            assert np.abs(head.apply("sorted", noisy, mask).values - ref).max() < 1e-6


def test_sorted_is_a_lossless_cross_section(head: SortedProjectionHead) -> None:
    z, mask = batch(5)
    values = head.apply("sorted", z, mask).values
    back, back_mask = head.unflatten(values)
    np.testing.assert_array_equal(back_mask.sum(1), mask.sum(1))
    for k in range(len(z)):
        n = int(mask[k].sum())
        assert np.allclose(
            orbit_distance(back[k, :n], z[k, :n]), 0, atol=1e-6
        )  # same rows, reordered
        assert (values[k].reshape(N, D)[n:] == head.padding_row()).all()  # padding sorts last
    raw_back, raw_mask = head.unflatten(head.apply("raw", z, mask).values)
    np.testing.assert_array_equal(raw_mask, mask)
    np.testing.assert_allclose(raw_back, z)


def test_every_embedding_the_head_produces_is_accepted_for_decoding(head) -> None:  # type: ignore[no-untyped-def]
    z, mask = batch(3)
    for name in ("sorted", "raw"):
        for row in head.apply(name, z, mask).values:
            assert head.embedding_error(row) is None
    no_atoms = np.tile(head.padding_row(), N)
    assert head.embedding_error(no_atoms) is None  # no atoms: decodes to a reason


MARKER = "1.25 in the row's first value, 0 in the others"


@pytest.mark.parametrize(
    ("padding", "position", "value", "words"),
    [
        ("marker", 5, np.nan, "row 1 (values 4..7), column 1: nan is neither"),
        ("marker", 0, np.inf, "row 0 (values 0..3), column 0: inf is neither"),
        (
            "marker",
            2,
            1.4,
            f"column 2: 1.4 is neither a latent value (|z| <= 1) nor padding ({MARKER})",
        ),
        ("marker", 4 * D, 1.25, f"row 4 (values 16..19) mixes padding ({MARKER}) with latent"),
        ("marker", 8 * D, 0.5, "row 8 (values 32..35) is an atom after padding row 6"),
        ("marker", 8 * D + 3, 0.5, "row 8 (values 32..35) mixes padding"),
        ("marker", 8 * D + 3, 7.0, "row 8 (values 32..35), column 3: 7 is neither"),
        ("fill", 2, 1.4, "column 2: 1.4 is neither a latent value (|z| <= 1) nor padding (2)"),
        ("fill", 4 * D + 1, 2.0, "row 4 (values 16..19) mixes padding (2) with latent values"),
        ("fill", 8 * D, 0.5, "row 8 (values 32..35) mixes padding"),
        ("fill", 8 * D + 3, 7.0, "row 8 (values 32..35), column 3: 7 is neither"),
    ],
)
def test_values_no_embedding_has_are_named(padding, position, value, words) -> None:  # type: ignore[no-untyped-def]
    pad_value = 2.0 if padding == "fill" else 1.25
    head = SortedProjectionHead(max_atoms=N, dim=D, pad_value=pad_value, padding=padding)
    z = np.full((1, N, D), 0.25, np.float32)
    mask = np.arange(N)[None] < 6  # rows 6..8 are padding
    row = head.apply("raw", z, mask).values[0].copy()
    row[position] = value
    reason = head.embedding_error(row)
    assert reason is not None and words in reason, reason


def test_padding_cannot_collide() -> None:
    with pytest.raises(ValueError):
        SortedProjectionHead(max_atoms=N, dim=D, latent_bound=1.0, pad_value=1.0)
    with pytest.raises(ValueError, match="padding must be one of marker, fill"):
        SortedProjectionHead(max_atoms=N, dim=D, padding="zeros")


def test_marker_padding_rows_and_their_sort_key_columns() -> None:
    head = SortedProjectionHead(max_atoms=N, dim=D)
    np.testing.assert_array_equal(head.padding_row(), [1.25, 0, 0, 0])
    # with two sort-key columns in front: those and the first latent value mark padding
    np.testing.assert_array_equal(head.padding_row(D + 2), [1.25, 1.25, 1.25, 0, 0, 0])
    fill = SortedProjectionHead(max_atoms=N, dim=D, pad_value=2.0, padding="fill")
    np.testing.assert_array_equal(fill.padding_row(D + 2), [2.0] * (D + 2))
    with pytest.raises(ValueError):
        head.padding_row(D - 1)


def test_a_real_row_at_the_bound_is_not_taken_for_padding() -> None:
    """The real row nearest the marker, (latent_bound, 0, ..., 0) (a saturated tanh), stays an atom:
    n atoms and n + 1 atoms of which the last is that row never coincide, and both come back."""
    head = SortedProjectionHead(max_atoms=N, dim=D)
    z = np.zeros((2, N, D), np.float32)
    z[:, :3] = np.random.default_rng(8).uniform(-0.9, 0.9, (3, D))
    z[1, 3] = [1.0, 0, 0, 0]
    mask = np.arange(N)[None] < np.array([[3], [4]])
    values = head.apply("sorted", z, mask).values
    assert np.linalg.norm(values[0] - values[1]) == pytest.approx(0.25)  # = pad_value - bound
    _, back_mask = head.unflatten(values)
    np.testing.assert_array_equal(back_mask.sum(1), [3, 4])
    assert all(head.embedding_error(v) is None for v in values)


def test_projection_json_without_a_padding_name_is_read_as_fill(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """qm9-vae <= 1.2.0 wrote no "padding" entry: its embeddings keep their meaning (all 2.0)."""
    path = tmp_path / "projection.json"
    path.write_text(
        '{"kind": "sorted_node_latents", "max_atoms": 9, "dim": 4, "latent_bound": 1.0, '
        '"pad_value": 2.0, "tol": 0.0001, "key": []}'
    )
    old = SortedProjectionHead.load(path)
    assert old.padding == "fill"
    z, mask = batch(9, 4)
    values = old.apply("sorted", z, mask).values.reshape(4, N, D)
    assert (values[~mask] == 2.0).all()
    assert "are all 2" in old.describe()[0].description


def test_every_projection_states_its_metric(head: SortedProjectionHead) -> None:
    assert {(p.name, p.metric, p.normalized) for p in head.describe()} == {
        ("sorted", "l2", False),
        ("sum", "l2", False),
        ("mean", "l2", False),
        ("raw", "l2", False),
    }


def test_sorting_scalars_is_isometric_and_rows_are_not() -> None:
    rng = np.random.default_rng(6)
    for _ in range(50):
        a, b = rng.normal(size=(7, 1)), rng.normal(size=(7, 1))
        d = np.linalg.norm(a[tolerant_order(a, 1e-9)] - b[tolerant_order(b, 1e-9)])
        assert d == pytest.approx(orbit_distance(a, b), rel=1e-9)
    for _ in range(50):
        a, b = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
        d = np.linalg.norm(a[tolerant_order(a, 1e-9)] - b[tolerant_order(b, 1e-9)])
        assert d >= orbit_distance(a, b) - 1e-9  # a cross-section never shrinks orbit distances


def test_orbit_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    brute = min(np.linalg.norm(a - b[list(p)]) for p in itertools.permutations(range(5)))
    assert orbit_distance(a, b) == pytest.approx(brute)


@pytest.mark.parametrize("n", range(1, 7))
def test_min_cost_assignment_matches_brute_force(n: int) -> None:
    """The numpy Hungarian algorithm (serving has no scipy), on random and tied costs."""
    rng = np.random.default_rng(n)
    for trial in range(30):
        cost = rng.normal(size=(n, n)) ** 2
        if trial % 3 == 0:
            cost = np.round(cost, 1)  # ties
        cols = min_cost_assignment(cost)
        assert sorted(cols.tolist()) == list(range(n))
        brute = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), cols].sum() == pytest.approx(brute, abs=1e-12)


def test_describe_and_unknown(head: SortedProjectionHead) -> None:
    info = {p.name: p for p in head.describe()}
    assert info["sorted"].dimension == N * D and info["sorted"].invariant
    assert not info["raw"].invariant and info["sum"].dimension == D
    with pytest.raises(KeyError):
        head.apply("max", *batch())


def test_save_load(tmp_path, head: SortedProjectionHead) -> None:  # type: ignore[no-untyped-def]
    head.save(tmp_path / "p.json")
    assert SortedProjectionHead.load(tmp_path / "p.json") == head


@pytest.mark.parametrize("by", ["smiles", "ranks"])
def test_canonical_rows_control_is_invariant_and_keeps_every_row(by: str) -> None:
    """The regression controls `raw_canonical(_ranks)` (evaluate._canonical_rows): rows of an
    equivariant per-atom feature put into RDKit's canonical SMILES atom order come out the same
    for every numbering, and are a permutation of the input rows."""
    pytest.importorskip("rdkit")
    from rdkit import Chem

    from quotient_models.molecules.evaluate import _canonical_rows
    from quotient_models.molecules.featurize import featurize

    base = Chem.MolFromSmiles("OCC(=O)NC1CC1")
    rng = np.random.default_rng(0)
    smiles = [
        Chem.MolToSmiles(
            Chem.RenumberAtoms(base, [int(i) for i in rng.permutation(base.GetNumAtoms())]),
            canonical=False,
        )
        for _ in range(5)
    ]
    n_max, z, mask = 9, [], []
    for s in smiles:
        g = featurize(s)
        degree = (g.bonds > 0).sum(1)
        rows = np.stack([g.atomic_numbers, g.hydrogens, degree], 1).astype(np.float32)
        z.append(np.pad(rows, ((0, n_max - len(rows)), (0, 0))))
        mask.append(np.arange(n_max) < len(rows))
    zc, mc = _canonical_rows(np.stack(z), np.stack(mask), smiles, by)
    assert (zc == zc[0]).all() and (mc == mc[0]).all()
    for k in range(len(smiles)):
        assert sorted(map(tuple, zc[k][mc[k]])) == sorted(map(tuple, z[k][mask[k]]))
    assert not all((z[k] == z[0]).all() for k in range(len(z)))  # the inputs did differ


def test_sort_key_columns_order_rows_first_and_are_never_output() -> None:
    head = SortedProjectionHead(max_atoms=3, dim=2, key=("element",))
    # row 0 has the larger key but the smaller latent: the key decides
    z = np.array([[[0.5, -0.9, -0.9], [-0.5, 0.9, 0.9], [0.0, 0.0, 0.0]]], np.float32)
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(
        head.apply("sorted", z, mask).values, [[0.9, 0.9, -0.9, -0.9, 1.25, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(
        head.apply("raw", z, mask).values, [[-0.9, -0.9, 0.9, 0.9, 1.25, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(head.apply("sum", z, mask).values, [[0.0, 0.0]])
    assert [p.dimension for p in head.describe()] == [6, 2, 2, 6]
    assert "(atom element, latent)" in head.describe()[0].description
    with pytest.raises(ValueError):  # the key columns are part of what apply expects
        head.apply("sorted", z[..., 1:], mask)


def test_type_coordinates_follow_the_atoms() -> None:
    from quotient_models.molecules.featurize import collate_graphs, featurize, type_coordinates
    from quotient_models.molecules.testing import QM9_DOMAIN

    graph = featurize("OC(=O)C1CN1")
    perm = np.random.default_rng(0).permutation(graph.n_atoms)
    a = collate_graphs([graph, graph.permuted(perm)], QM9_DOMAIN)
    t = type_coordinates(a["atoms"], a["bonds"], QM9_DOMAIN)
    n = graph.n_atoms
    np.testing.assert_array_equal(t[1, :n], t[0, perm])
    assert (np.abs(t[:, :n]) < 1).all() and (t[:, n:] == 0).all()
    # OH, C(=O), =O, ring CH, ring CH2 and NH: six different (element, degree, hydrogens)
    assert len({tuple(r) for r in t[0, :n]}) == n
    np.testing.assert_allclose(t[0, 0], [0.25, -2 / 3, -0.4], rtol=1e-6)  # O, degree 1, 1 H


def test_fill_padding_lets_the_atom_count_decide_the_nearest_molecule_and_marker_does_not() -> None:
    """A: five atoms; B: A's five and one more; C: five atoms each unlike A's. With every padding
    value 2.0 the missing atom alone puts B farther from A than C is; with the marker row B, which
    shares all of A's atoms, is nearer."""
    rows = np.random.default_rng(10).uniform(-0.3, 0.3, (5, D))
    z = np.zeros((3, N, D), np.float32)
    z[0, :5] = z[1, :5] = rows
    z[1, 5] = [0.1, 0.0, 0.0, 0.0]
    z[2, :5] = rows + 0.6
    mask = np.arange(N)[None] < np.array([[5], [6], [5]])
    marker = SortedProjectionHead(max_atoms=N, dim=D)
    fill = SortedProjectionHead(max_atoms=N, dim=D, pad_value=2.0, padding="fill")
    for head, nearest_to_a in ((fill, 2), (marker, 1)):
        e = head.apply("sorted", z, mask).values
        d = np.linalg.norm(e[1:] - e[0], axis=1)
        assert 1 + int(d.argmin()) == nearest_to_a, (head.padding, d)


def test_colour_ranks_follow_the_atoms_and_rank_rows_lexicographically() -> None:
    import dataclasses

    from quotient_models.molecules.featurize import collate_graphs, colour_ranks, featurize
    from quotient_models.molecules.testing import QM9_DOMAIN

    domain = dataclasses.replace(QM9_DOMAIN, max_atoms=12)
    # propane: the two CH3 are symmetric (slots 0 and 1), so the rows are CH2 < CH3/0 < CH3/1
    propane = collate_graphs([featurize("CCC")], domain)
    assert colour_ranks(propane["atoms"], propane["bonds"], 0)[0, :3].tolist() == [1, 0, 2]
    graphs = [featurize(s) for s in ("OC(=O)C1CN1", "CC(C)(C)c1ccc(O)cc1", "N#CCC#N")]
    rng = np.random.default_rng(0)
    perms = [rng.permutation(g.n_atoms) for g in graphs]
    a = collate_graphs(graphs + [g.permuted(p) for g, p in zip(graphs, perms, strict=True)], domain)
    for rounds in (0, 1, 4):
        c = colour_ranks(a["atoms"], a["bonds"], rounds)
        for k, (g, p) in enumerate(zip(graphs, perms, strict=True)):
            n = g.n_atoms
            np.testing.assert_array_equal(c[3 + k, :n], c[k, p])  # renumbering permutes them
            assert sorted(set(c[k, :n])) == list(range(c[k, :n].max() + 1))  # ranks 0..m-1
            assert (c[k, n:] == -1).all()
    # one round: an atom's colour now depends on its neighbours (C of C#N vs the CH2 next to it)
    c0, c1 = (colour_ranks(a["atoms"], a["bonds"], r)[2, :4] for r in (0, 1))
    assert len(set(c1)) >= len(set(c0))


def test_the_colour_key_keeps_sorted_invariant_where_a_latent_near_tie_reordered_rows() -> None:
    """druglike-vae 1.0.0 (type key, then latent) reordered two rows of these molecules in some
    numberings (relative change 0.24 and 0.12); with the colour key before the latent the sorted
    embedding of every numbering is the same up to float noise."""
    import dataclasses

    from quotient_models.molecules.evaluate import _renumbered_chunk
    from quotient_models.molecules.featurize import TYPE_KEY
    from quotient_models.molecules.model import load_molecule_model

    models = Path(__file__).resolve().parents[2] / "model_store" / "models"
    model = load_molecule_model(models / "druglike-vae", "onnx", threads=1)
    assert "colour" in model.head.key and model.head.colour_rounds == 4
    smiles = ["COc1ccc(Cl)cc1C(=O)Nc1ccc(N2CCCC2=O)cc1", "N#Cc1ncn(CC(=O)Nc2cc3c(cc2Cl)OCCCO3)n1"]
    served = _renumbered_chunk(model, smiles, 20, [0, 1])[0]["sorted"]
    assert served.max() < 1e-5, served
    model.head = dataclasses.replace(model.head, key=TYPE_KEY, colour_rounds=0)
    model.n_type = len(TYPE_KEY)
    before = _renumbered_chunk(model, smiles, 20, [0, 1])[0]["sorted"]
    assert (before > 0.1).all(), before  # the 1.0.0 order: these numberings reorder rows


def test_molecules_colour_refinement_does_not_separate_share_one_embedding() -> None:
    """The limit of an injective projection on a message-passing encoder: it separates no more
    molecules than colour refinement (1-WL) does. Two N-substituted pyrrolidines joined by a C-C
    bond and the fused bicycle of two six-membered rings on the same atoms (bicyclopentyl and
    decalin, the textbook pair) get one ``sorted`` embedding up to float noise, so Decode may
    answer either. These are the two MOSES test molecules druglike-vae 1.1.0 decodes as the
    other one (its card: "another molecule's SMILES returned for 2")."""
    from quotient_models.molecules.model import load_molecule_model

    models = Path(__file__).resolve().parents[2] / "model_store" / "models"
    model = load_molecule_model(models / "druglike-vae", "onnx", threads=1)
    for joined, fused in [
        ("CCC(=O)N1CCCC1C1CCCN1c1nc2ccccc2o1", "CCC(=O)N1CCCC2C1CCCN2c1nc2ccccc2o1"),
        ("CCC(=O)N1CCCC1C1CCCN1c1ncnc2c1cnn2C", "CCC(=O)N1CCCC2C1CCCN2c1ncnc2c1cnn2C"),
    ]:
        graphs = [model.graph(s) for s in (joined, fused)]
        assert graphs[0].smiles != graphs[1].smiles  # two molecules
        values = model.embed_batch(model.collate([model.item(g) for g in graphs]), "sorted").values
        assert np.linalg.norm(values[0] - values[1]) < 1e-5 * np.linalg.norm(values[0])
        decoded = model.decode(values[:1])[0]
        assert decoded.smiles in {graphs[0].smiles, graphs[1].smiles}, decoded.reason
