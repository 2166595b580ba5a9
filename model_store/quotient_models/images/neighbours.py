"""Which distance each rotmnist-c8 projection is searched with: 10-NN label agreement, L2 against
cosine (the figures behind ``CyclicProjectionHead.describe``'s ``metric``).

    python -m quotient_models.images.neighbours --data data/mnist --model DIR

prints, for every projection and both metrics, the share of the 10 nearest neighbours with the
query's label, the queries being the 1000 test digits rotated by the test split's evaluation
angles and the gallery (a) the other 999 rotated test digits, (b) the 8000 training digits
rotated by the training split's angles; and recall@1 of each rotated test digit's upright copy
among the 1000 upright test digits (``evaluate``'s retrieval figure, under each metric).
``chosen`` is the rule ``CyclicProjectionHead.describe`` follows: the metric with the higher mean
of the two label agreements, L2 unless cosine leads by more than ``MARGIN``; ``served`` is what
the model states.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from quotient_models.images.evaluate import Evaluator
from quotient_models.neighbours import label_agreement, nearest

__all__ = ["measure"]

K = 10
METRICS = ("l2", "cosine")
MARGIN = 0.005


def measure(ev: Evaluator, k: int = K) -> dict[str, Any]:
    """The module docstring's figures: projection → metric → figure → value, with the metric the
    projection states under ``"served"`` and the one the rule picks under ``"chosen"``."""
    x, y, xr = ev.split("test")
    _, y_train, xr_train = ev.split("train")
    out: dict[str, Any] = {"k": k, "test_digits": len(y), "train_digits": len(y_train)}
    for p in ev.projections:
        queries, upright = ev.embed(p.name, xr), ev.embed(p.name, x)
        gallery = ev.embed(p.name, xr_train)
        row: dict[str, Any] = {"served": p.metric}
        for metric in METRICS:
            first = nearest(queries, 1, metric, gallery=upright)[:, 0]
            row[metric] = {
                "label_agreement_test": label_agreement(nearest(queries, k, metric), y, y),
                "label_agreement_train": label_agreement(
                    nearest(queries, k, metric, gallery=gallery), y_train, y
                ),
                "recall_at_1_upright": float((first == np.arange(len(y))).mean()),
            }
        lead = {
            m: (row[m]["label_agreement_test"] + row[m]["label_agreement_train"]) / 2
            for m in METRICS
        }
        row["chosen"] = "cosine" if lead["cosine"] > lead["l2"] + MARGIN else "l2"
        out[p.name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/mnist")
    p.add_argument("--model", default="model_store/models/rotmnist-c8")
    p.add_argument("--engine", choices=("onnx", "torch"), default="onnx")
    args = p.parse_args(argv)
    print(
        json.dumps({"neighbours": measure(Evaluator(args.model, args.data, args.engine))}, indent=2)
    )


if __name__ == "__main__":
    main()
