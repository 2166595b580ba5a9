"""Measure the rotmnist-c8 model card's figures through the serving path (ONNX, no escnn).

``python -m quotient_models.images.evaluate
{calibrate,invariance,retention,retrieval,framing,neighbours,all} --data data/mnist --model
model_store/models/rotmnist-c8``

Every image goes through the served input policy first (``ImageModel.frame``: polarity, then the
frame of ``model.json`` ``input.frame``), as the service prepares a decoded file.

calibrate: the frame's ``radius``, the median content size of the 8000 training digits, written
    into model.json (so that MNIST digits keep their size in the median);

(a) invariance: relative change ‖p(x) − p(g·x)‖/‖p(x)‖ of every projection under exact 90/180/270
    degree rotations (``torch.rot90``) and under the test split's continuous evaluation angles;
(b) retention (the paper's experiment): kNN (k=5) and linear-probe accuracy of each projection,
    trained on rotated training digits, tested on rotated test digits;
(c) retrieval: recall@1 of each rotated test digit's unrotated copy among the 1000 unrotated
    test digits (Euclidean), for every projection and the radial-profile baseline;
(d) framing: copies of the 1000 test digits at random positions and scales (0.5x-2x) on larger
    canvases, upright and randomly rotated, clean, noisy (grey paper, noise, JPEG) or with
    specks: rank-1 retrieval of the original among the test digits and the median relative
    change of the default projection, under the policy before the frame (1.0.0), centring alone,
    centring and a bounding box (MNIST's rule, orientation-dependent) and the served frame; with
    the change on the test digits themselves and the kNN / linear-probe accuracy of each;
(e) neighbours: which distance each projection is searched with, L2 against cosine
    (``quotient_models.images.neighbours``: 10-NN label agreement and recall@1).

The default projection is the invariant one with the highest mean of kNN and linear-probe
accuracy in (b); it is written into model.json. Figures go to metrics.json and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quotient_models.images.data import eval_angles, load_mnist
from quotient_models.images.framing import Framing, find_content, levels
from quotient_models.images.model import ImageModel
from quotient_models.images.preprocess import model_input
from quotient_models.images.transforms import radial_profile, rotate_numpy
from quotient_models.invariance import invariance_report, relative_change
from quotient_models.runtime import load_model

__all__ = [
    "COPY_SETS",
    "Evaluator",
    "calibrate_radius",
    "knn_accuracy",
    "linear_probe_accuracy",
    "make_copies",
    "recall_at_1",
]

EXACT = {"rot90": 1, "rot180": 2, "rot270": 3}
TRAIN_ANGLE_NOTE = "training digits rotated by eval_angles('train') (seeded, fixed)"
COPY_SEED = 20261125
# (name, canvas side, rotated, degradation) of the copies measured in (d)
COPY_SETS = (
    ("canvas64", 64, False, "clean"),
    ("canvas64_rotated", 64, True, "clean"),
    ("canvas256", 256, False, "clean"),
    ("canvas256_rotated", 256, True, "clean"),
    ("canvas128_rotated_noisy", 128, True, "noisy"),
    ("canvas128_rotated_specks", 128, True, "specks"),
)
# the policies compared in (d): None is the policy before the frame (1.0.0: 28x28 used as is)
VARIANTS = ("before", "centre", "box", "served")


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def recall_at_1(queries: np.ndarray, gallery: np.ndarray) -> float:
    """Fraction of queries whose nearest gallery item (Euclidean) has the same index."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    d2 = (q**2).sum(1)[:, None] - 2 * q @ g.T + (g**2).sum(1)[None]
    return float((d2.argmin(axis=1) == np.arange(len(q))).mean())


def knn_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray
) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(n_neighbors=5).fit(train, y_train).score(test, y_test))


def linear_probe_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray
) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(probe.fit(train, y_train).score(test, y_test))


def calibrate_radius(images: np.ndarray, framing: Framing) -> float:
    """Median content size (``Framing.size``) of MNIST-framed digits [n, 28, 28]: the frame
    radius under which they keep their size in the median."""
    sizes = []
    for g in images:
        levelled = levels(np.asarray(g, np.float32))
        content = None if levelled is None else find_content(levelled, framing)
        if content is not None:
            sizes.append(content.size)
    return float(np.median(sizes))


def _degrade(canvas: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "noisy":  # grey paper, sensor noise, JPEG at quality 70, decoded back
        import io

        from PIL import Image

        v = 0.15 + 0.8 * canvas + rng.normal(0.0, 0.04, canvas.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.round(v * 255), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=70
        )
        with Image.open(buf) as decoded:
            return np.asarray(decoded.convert("L"), np.float32) / 255.0
    if kind == "specks":  # six 2x2 specks as bright as the ink, anywhere
        out = canvas.copy()
        for _ in range(6):
            y, x = rng.integers(0, canvas.shape[0] - 1), rng.integers(0, canvas.shape[1] - 1)
            out[y : y + 2, x : x + 2] = 1.0
        return out
    return canvas


def make_copies(
    digits: np.ndarray, canvas: int, rotated: bool, kind: str, seed: int = COPY_SEED
) -> np.ndarray:
    """Copies of 28x28 digits [n, 28, 28] on ``canvas`` x ``canvas`` canvases [n, C, C]: each
    rotated by a uniform random angle (when ``rotated``), resized (bilinear, antialiased) by a
    log-uniform random factor in [0.5, 2], placed at a uniform random position where it fits
    whole, then degraded (``kind``: clean, noisy, specks). Seeded by (seed, canvas, rotated,
    kind)."""
    from PIL import Image

    rng = np.random.default_rng(
        [seed, canvas, int(rotated), ("clean", "noisy", "specks").index(kind)]
    )
    n = len(digits)
    scales = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    src = rotate_numpy(digits, rng.uniform(0.0, 360.0, n)) if rotated else digits
    out = np.zeros((n, canvas, canvas), np.float32)
    for i in range(n):
        side = min(canvas, max(2, round(28 * scales[i])))
        img = Image.fromarray(np.asarray(src[i], np.float32), mode="F")
        small = np.asarray(img.resize((side, side), Image.Resampling.BILINEAR), np.float32)
        y, x = rng.integers(0, canvas - side + 1, 2)
        out[i, y : y + side, x : x + side] = np.clip(small, 0.0, 1.0)
        out[i] = _degrade(out[i], kind, rng)
    return out


class Evaluator:
    """Latents through the served encoder (cached per input array), projections through its head;
    every image is first made into a model input by the served policy (``ImageModel.frame``)."""

    def __init__(self, model_dir: str, data_dir: str, engine: str = "onnx") -> None:
        model = load_model(model_dir, engine=engine)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{model_dir} is not an image model")
        self.model = model
        self.data = load_mnist(data_dir)
        self.projections = [p for p in model.projections()]
        self._cache: dict[str, np.ndarray] = {}

    def inputs(self, images: np.ndarray, framing: Framing | str | None = "served") -> np.ndarray:
        """Model inputs [n, 28, 28] of grayscale images [n, H, W] under the served policy, or
        under ``framing`` (None: the policy before the frame), cached."""
        policy = self.model.framing if framing == "served" else framing
        assert not isinstance(policy, str)
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim == 4:
            x = x[:, 0]
        key = "in" + hashlib.sha1(x.tobytes()).hexdigest() + str(x.shape) + repr(policy)
        if key not in self._cache:
            self._cache[key] = np.stack([model_input(g, self.model.size, policy) for g in x])
        return self._cache[key]

    def latent(
        self, images: np.ndarray, framing: Framing | str | None = "served", batch: int = 500
    ) -> np.ndarray:
        x = self.inputs(images, framing)[:, None]
        key = hashlib.sha1(x.tobytes()).hexdigest() + str(x.shape)
        if key not in self._cache:
            self._cache[key] = np.concatenate(
                [self.model.latent(x[i : i + batch]) for i in range(0, len(x), batch)]
            )
        return self._cache[key]

    def embed(
        self, name: str, images: np.ndarray, framing: Framing | str | None = "served"
    ) -> np.ndarray:
        if name == "radial_profile":
            return radial_profile(self.inputs(images, framing))
        return self.model.head.apply(name, self.latent(images, framing)).values

    def split(self, name: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels, rotated images by the split's evaluation angles)."""
        x, y = self.data[name]
        x, y = x[:n], y[:n]
        return x, y, rotate_numpy(x, eval_angles(name, len(x)))

    # (a)
    def invariance(self) -> dict[str, dict[str, dict[str, float]]]:
        x, _, _ = self.split("test")
        angles = eval_angles("test", len(x))

        def quarter_turns(k: int) -> Callable[[np.ndarray], np.ndarray]:
            return lambda a: torch.rot90(torch.from_numpy(a), k, dims=(-2, -1)).numpy().copy()

        def continuous(a: np.ndarray) -> np.ndarray:
            return rotate_numpy(a, angles)

        transforms = {name: quarter_turns(k) for name, k in EXACT.items()}
        transforms["continuous"] = continuous
        out: dict[str, dict[str, dict[str, float]]] = {}
        for p in self.projections:
            out[p.name] = {}

            def fn(a: np.ndarray, name: str = p.name) -> np.ndarray:
                return self.embed(name, a)

            for t, f in transforms.items():
                rep = invariance_report(fn, x, {t: f})
                out[p.name][t] = {"median": rep.median, "p99": rep.p99, "max": rep.max}
        return out

    # (b)
    def retention(self) -> dict[str, dict[str, float]]:
        _, y_train, xr_train = self.split("train")
        _, y_test, xr_test = self.split("test")
        out: dict[str, dict[str, float]] = {}
        for name in [p.name for p in self.projections] + ["radial_profile"]:
            a, b = self.embed(name, xr_train), self.embed(name, xr_test)
            out[name] = {
                "knn": knn_accuracy(a, y_train, b, y_test),
                "linear": linear_probe_accuracy(a, y_train, b, y_test),
            }
            _log(f"retention {name}: knn {out[name]['knn']:.4f} linear {out[name]['linear']:.4f}")
        return out

    # (c)
    def retrieval(self) -> dict[str, float]:
        x, _, xr = self.split("test")
        names = [p.name for p in self.projections] + ["radial_profile"]
        return {n: recall_at_1(self.embed(n, xr), self.embed(n, x)) for n in names}

    # (d)
    def variants(self) -> dict[str, Framing | None]:
        """The policies compared in (d), each calibrated on the training digits."""
        served = self.model.framing
        if served is None:
            raise ValueError("model.json has no input.frame: run `calibrate` first")
        x_train = self.data["train"][0]
        out: dict[str, Framing | None] = {"before": None}
        for name, size in (("centre", "none"), ("box", "box")):
            probe = replace(served, size=size)
            radius = calibrate_radius(x_train, probe) if size != "none" else served.radius
            out[name] = replace(probe, radius=radius)
        out["served"] = served
        return out

    def framing(self) -> dict[str, dict[str, float]]:
        x, _, _ = self.split("test")
        _, y_train, xr_train = self.split("train")
        _, y_test, xr_test = self.split("test")
        default = self.model.spec.default_projection
        copies = {name: make_copies(x, c, r, k) for name, c, r, k in COPY_SETS}
        out: dict[str, dict[str, float]] = {}
        before = self.embed(default, x, None)
        for variant, policy in self.variants().items():
            gallery = self.embed(default, x, policy)
            res = {"mnist_change": float(np.median(relative_change(before, gallery)))}
            if variant != "served":  # the served policy's accuracy is in (b)
                a, b = self.embed(default, xr_train, policy), self.embed(default, xr_test, policy)
                res["knn"] = knn_accuracy(a, y_train, b, y_test)
                res["linear"] = linear_probe_accuracy(a, y_train, b, y_test)
            if policy is not None:
                res["radius"] = policy.radius
            for name, images in copies.items():
                q = self.embed(default, images, policy)
                res[f"{name}.rank1"] = recall_at_1(q, gallery)
                res[f"{name}.change"] = float(np.median(relative_change(gallery, q)))
            out[variant] = res
            _log(f"framing {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        return out


def choose_default(retention: dict[str, dict[str, float]], invariant: list[str]) -> str:
    """The invariant projection with the highest mean of kNN and linear-probe accuracy."""
    return max(invariant, key=lambda n: (retention[n]["knn"] + retention[n]["linear"]) / 2)


# ------------------------------------------------------------------ metrics.json and the card


def _metric(name: str, value: float, description: str, command: str) -> dict[str, Any]:
    return {"name": name, "value": float(value), "description": description, "command": command}


def invariance_metrics(res: dict, command: str) -> list[dict[str, Any]]:
    rows = []
    for proj, per in res.items():
        for t, stats in per.items():
            what = (
                f"rotation by {t[3:]} degrees (torch.rot90, exact)"
                if t in EXACT
                else ("rotation by the test split's continuous evaluation angles (bilinear)")
            )
            for stat, v in stats.items():
                rows.append(
                    _metric(
                        f"invariance.{t}.{proj}.{stat}_relative_change",
                        v,
                        f"{stat} over the 1000 test digits of ||p(x)-p(g.x)||/||p(x)|| for "
                        f"projection "
                        f"'{proj}' under {what}",
                        command,
                    )
                )
    return rows


def retention_metrics(res: dict, command: str) -> list[dict[str, Any]]:
    rows = []
    for proj, accs in res.items():
        rows.append(
            _metric(
                f"retention.knn.{proj}",
                accs["knn"],
                f"5-NN accuracy on '{proj}' embeddings; fit on the 8000 {TRAIN_ANGLE_NOTE}, "
                "scored on the 1000 test digits rotated by eval_angles('test')",
                command,
            )
        )
        rows.append(
            _metric(
                f"retention.linear.{proj}",
                accs["linear"],
                f"logistic-regression (standardized features) accuracy on '{proj}' embeddings; "
                f"fit on the 8000 {TRAIN_ANGLE_NOTE}, scored on the rotated test digits",
                command,
            )
        )
    return rows


def retrieval_metrics(res: dict, command: str) -> list[dict[str, Any]]:
    return [
        _metric(
            f"retrieval.recall_at_1.{proj}",
            v,
            f"fraction of the 1000 test digits rotated by eval_angles('test') whose nearest "
            f"(Euclidean, '{proj}') among the 1000 unrotated test digits is their own copy",
            command,
        )
        for proj, v in res.items()
    ]


_COPY_TEXT = {
    "canvas64": "on 64x64 canvases",
    "canvas64_rotated": "rotated by uniform random angles, on 64x64 canvases",
    "canvas256": "on 256x256 canvases",
    "canvas256_rotated": "rotated by uniform random angles, on 256x256 canvases",
    "canvas128_rotated_noisy": (
        "rotated, on 128x128 canvases of grey paper (0.15 + 0.8 v) with Gaussian noise "
        "(sigma 0.04) saved as JPEG at quality 70"
    ),
    "canvas128_rotated_specks": (
        "rotated, on 128x128 canvases with six 2x2 specks as bright as the ink"
    ),
}
_VARIANT_TEXT = {
    "before": "the policy before the frame (1.0.0: a 28x28 image used as it is, others fitted)",
    "centre": "centring by the centre of mass alone (no scaling)",
    "box": "centring and scaling half the bounding box's longest side (MNIST's rule)",
    "served": "the served frame (centre of mass, radius holding 95% of the ink)",
}


def framing_metrics(res: dict[str, dict[str, float]], command: str) -> list[dict[str, Any]]:
    rows = []
    for variant, per in res.items():
        policy = _VARIANT_TEXT[variant]
        for key, v in per.items():
            if key == "mnist_change":
                what = (
                    "median over the 1000 test digits of the relative change of the default "
                    "projection from the policy before the frame"
                )
            elif key in ("knn", "linear"):
                kind = "5-NN" if key == "knn" else "logistic-regression (standardized)"
                what = (
                    f"{kind} accuracy of the default projection, fit on the 8000 "
                    f"{TRAIN_ANGLE_NOTE}, scored on the rotated test digits"
                )
            elif key == "radius":
                what = "frame radius (output pixels), calibrated on the 8000 training digits"
            else:
                copies, stat = key.rsplit(".", 1)
                where = _COPY_TEXT[copies]
                what = (
                    f"fraction of copies of the 1000 test digits, scaled by 0.5x-2x and placed "
                    f"at random {where}, whose nearest test digit (Euclidean, default "
                    "projection) is their original"
                    if stat == "rank1"
                    else f"median relative change of the default projection from the original "
                    f"test digit to its copy scaled by 0.5x-2x and placed at random {where}"
                )
            rows.append(_metric(f"framing.{variant}.{key}", v, f"{what}; {policy}", command))
    return rows


def calibrate(model_dir: Path, data_dir: str) -> Framing:
    """Set model.json's ``input.frame.radius`` to the median content size of the training
    digits (adding the frame with its defaults where model.json has none)."""
    spec_path = model_dir / "model.json"
    spec = json.loads(spec_path.read_text())
    frame = spec.setdefault("input", {}).get("frame") or {"radius": 1.0}
    policy = Framing.from_spec(frame)
    assert policy is not None
    radius = round(calibrate_radius(load_mnist(data_dir)["train"][0], policy), 2)
    policy = replace(policy, radius=radius)
    spec["input"]["frame"] = asdict(policy)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    _log(f"frame radius {radius} (median of the training digits; written to {spec_path})")
    return policy


_NEIGHBOUR_TEXT = {
    "label_agreement_test": "share of the {k} nearest of the other rotated test digits with the "
    "query's label",
    "label_agreement_train": "share of the {k} nearest of the 8000 rotated training digits with "
    "the query's label",
    "recall_at_1_upright": "fraction whose nearest upright test digit is its own upright copy",
}


def neighbours_metrics(res: dict[str, Any], command: str) -> list[dict[str, Any]]:
    """``neighbours.<projection>.<metric>.<figure>`` from ``images.neighbours.measure``."""
    rows = []
    for proj, row in res.items():
        if not isinstance(row, dict):
            continue
        for metric in ("l2", "cosine"):
            for figure, value in row[metric].items():
                text = _NEIGHBOUR_TEXT[figure].format(k=res["k"])
                rows.append(
                    _metric(
                        f"neighbours.{proj}.{metric}.{figure}",
                        value,
                        f"1000 test digits rotated by eval_angles('test'), '{proj}' under "
                        f"{metric}: {text}",
                        command,
                    )
                )
    return rows


def merge_metrics(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    old = json.loads(path.read_text()) if path.exists() else []
    names = {m["name"] for m in new}
    merged = [m for m in old if m["name"] not in names] + new
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quotient_models.images.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "what",
        choices=[
            "calibrate",
            "invariance",
            "retention",
            "retrieval",
            "framing",
            "neighbours",
            "all",
        ],
    )
    parser.add_argument("--data", default="data/mnist")
    parser.add_argument("--model", default="model_store/models/rotmnist-c8")
    args = parser.parse_args(argv)
    from quotient_models.images import _card

    def cmd(what: str) -> str:
        return shlex.join(
            [
                "python",
                "-m",
                "quotient_models.images.evaluate",
                what,
                "--data",
                args.data,
                "--model",
                args.model,
            ]
        )

    model_dir = Path(args.model)
    if args.what in ("calibrate", "all"):
        calibrate(model_dir, args.data)
    ev = Evaluator(args.model, args.data)
    new: list[dict[str, Any]] = []
    ret: dict[str, dict[str, float]] = {}
    if args.what in ("invariance", "all"):
        _log("(a) invariance ...")
        inv = ev.invariance()
        print(_card.invariance_table(inv))
        new += invariance_metrics(inv, cmd("invariance"))
    if args.what in ("retention", "all"):
        _log("(b) retention (embedding 8000 rotated training digits) ...")
        ret = ev.retention()
        print(_card.retention_table(ret))
        new += retention_metrics(ret, cmd("retention"))
        invariant = [p.name for p in ev.projections if p.invariant]
        default = choose_default(ret, invariant)
        spec_path = model_dir / "model.json"
        spec = json.loads(spec_path.read_text())
        spec["default_projection"] = default
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        _log(f"default projection: {default} (written to {spec_path})")
    if args.what in ("retrieval", "all"):
        _log("(c) retrieval ...")
        rec = ev.retrieval()
        print(_card.retrieval_table(rec))
        new += retrieval_metrics(rec, cmd("retrieval"))
    if args.what in ("framing", "all"):
        _log("(d) framing: copies on larger canvases, four policies ...")
        fra = ev.framing()
        print(_card.framing_table(fra, ret.get(ev.model.spec.default_projection) if ret else None))
        new += framing_metrics(fra, cmd("framing"))
    if args.what in ("neighbours", "all"):
        from quotient_models.images.neighbours import measure

        _log("(e) distance: 10-NN label agreement, L2 against cosine ...")
        near = measure(ev)
        print(_card.neighbours_table(_card.neighbours_from(near)))
        new += neighbours_metrics(near, cmd("neighbours"))
    metrics = merge_metrics(model_dir / "metrics.json", new)
    checks = _card.write_card(model_dir, metrics, ev.projections)
    for line in checks:
        print(line)
    return 0 if all(line.startswith("PASS") for line in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
