"""Measure the rotmnist-c8 model card's figures through the serving path (ONNX, no escnn).

``python -m quotient_models.images.evaluate {invariance,retention,retrieval,all} --data data/mnist
--model model_store/models/rotmnist-c8``

(a) invariance: relative change ‖p(x) − p(g·x)‖/‖p(x)‖ of every projection under exact 90/180/270
    degree rotations (``torch.rot90``) and under the test split's continuous evaluation angles;
(b) retention (the paper's experiment): kNN (k=5) and linear-probe accuracy of each projection,
    trained on rotated training digits, tested on rotated test digits;
(c) retrieval: recall@1 of each rotated test digit's unrotated copy among the 1000 unrotated
    test digits (Euclidean), for every projection and the radial-profile baseline.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quotient_models.images.data import eval_angles, load_mnist
from quotient_models.images.transforms import radial_profile, rotate_numpy
from quotient_models.invariance import invariance_report
from quotient_models.runtime import ImageModel, load_model

__all__ = ["Evaluator", "knn_accuracy", "linear_probe_accuracy", "recall_at_1"]

EXACT = {"rot90": 1, "rot180": 2, "rot270": 3}
TRAIN_ANGLE_NOTE = "training digits rotated by eval_angles('train') (seeded, fixed)"


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


class Evaluator:
    """Latents through the served encoder (cached per input array), projections through its head."""

    def __init__(self, model_dir: str, data_dir: str, engine: str = "onnx") -> None:
        model = load_model(model_dir, engine=engine)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{model_dir} is not an image model")
        self.model = model
        self.data = load_mnist(data_dir)
        self.projections = [p for p in model.projections()]
        self._cache: dict[str, np.ndarray] = {}

    def latent(self, images: np.ndarray, batch: int = 500) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        key = hashlib.sha1(x.tobytes()).hexdigest() + str(x.shape)
        if key not in self._cache:
            self._cache[key] = np.concatenate(
                [self.model.latent(x[i : i + batch]) for i in range(0, len(x), batch)]
            )
        return self._cache[key]

    def embed(self, name: str, images: np.ndarray) -> np.ndarray:
        if name == "radial_profile":
            return radial_profile(images)
        return self.model.head.apply(name, self.latent(images)).values

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
    parser.add_argument("what", choices=["invariance", "retention", "retrieval", "all"])
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

    ev = Evaluator(args.model, args.data)
    model_dir = Path(args.model)
    new: list[dict[str, Any]] = []
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
    metrics = merge_metrics(model_dir / "metrics.json", new)
    checks = _card.write_card(model_dir, metrics, ev.projections)
    for line in checks:
        print(line)
    return 0 if all(line.startswith("PASS") for line in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
