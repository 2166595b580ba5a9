"""A scikit-learn pipeline on Quotient embeddings: train on upright digits, test on rotated ones.

Splits a folder of labelled images (``FOLDER/<label>/<name>.png``, as ``make_digit_folder.py``
writes; the label is the sub-folder's name) into a training and a test part, trains
``Pipeline([("embed", QuotientEmbedder(...)), ("clf", LogisticRegression())])`` on the upright
training images and measures its accuracy on randomly rotated copies of the test images, next
to the same classifier on raw pixels. Then it pickles the fitted pipeline (the pickle holds no
connection and no API key), loads it back and checks that it predicts the same.

Run it against a running server (``make serve`` in another terminal), with the client's
scikit-learn extra (``pip install './clients/python[sklearn]'``)::

    python examples/make_digit_folder.py --out digits --n 500
    python examples/sklearn_pipeline.py --folder digits
    python examples/sklearn_pipeline.py --folder digits --test-share 0.5 --save digits.pkl

``--target HOST:PORT`` (default ``$QUOTIENT_TARGET``, else ``127.0.0.1:50051``) names the
server; an API key is taken from ``$QUOTIENT_API_KEY`` (also by the unpickled pipeline).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from quotient_client.sklearn import QuotientEmbedder

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def split_folder(
    folder: Path, test_share: float, seed: int
) -> tuple[list[Path], list[str], list[Path], list[str]]:
    """The images under ``folder`` and their labels (sub-folder names), shuffled with ``seed``
    and split → train paths, train labels, test paths, test labels."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    order = np.random.default_rng(seed).permutation(len(paths))
    n_test = round(len(paths) * test_share)
    test, train = [paths[i] for i in order[:n_test]], [paths[i] for i in order[n_test:]]
    return train, [p.parent.name for p in train], test, [p.parent.name for p in test]


def turned(paths: list[Path], seed: int) -> list[Image.Image]:
    """Each image turned by a random angle about its centre (uncovered corners black)."""
    rng = np.random.default_rng(seed)
    return [
        Image.open(p).convert("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BICUBIC)
        for p in paths
    ]


def pixels(images: list[Image.Image | Path]) -> np.ndarray:
    """The images as rows of grayscale pixels in [0, 1] (all must have one size)."""
    return np.stack(
        [np.asarray(Image.open(i) if isinstance(i, Path) else i, np.float32).ravel() / 255
         for i in images]
    )  # fmt: skip


def accuracy(predicted: np.ndarray, labels: list[str]) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("QUOTIENT_TARGET", "127.0.0.1:50051"),
        help="the Quotient server, HOST:PORT (default: $QUOTIENT_TARGET or 127.0.0.1:50051)",
    )
    parser.add_argument("--folder", type=Path, required=True, help="FOLDER/<label>/<image>")
    parser.add_argument("--test-share", type=float, default=0.3, help="default 0.3")
    parser.add_argument("--seed", type=int, default=0, help="the split and the angles")
    parser.add_argument("--projection", help="default: the model's default projection")
    parser.add_argument("--save", type=Path, help="where to pickle the fitted pipeline")
    args = parser.parse_args(argv)

    train, y_train, test, y_test = split_folder(args.folder, args.test_share, args.seed)
    if len(set(y_train)) < 2 or not test:
        print(f"error: {args.folder}: need images of 2 or more labels in the training part and a "
              "non-empty test part", file=sys.stderr)  # fmt: skip
        return 2
    rotated_test = turned(test, args.seed)

    pipe = Pipeline(
        [
            ("embed", QuotientEmbedder(args.target, projection=args.projection)),
            ("clf", LogisticRegression(max_iter=2000)),
        ]
    )
    pipe.fit([str(p) for p in train], y_train)  # image paths; labels are the sub-folder names
    embedder = pipe.named_steps["embed"]
    predicted = pipe.predict(rotated_test)
    print(f"trained on {len(train)} upright images, {len(set(y_train))} labels, with "
          f"{embedder.spec_.label()}")  # fmt: skip
    print(f"accuracy on {len(test)} upright test images:  {pipe.score(test, y_test):.3f}")
    print(f"accuracy on the same, randomly rotated:     {accuracy(predicted, y_test):.3f}")
    if len({Image.open(p).size for p in [*train, *test]}) == 1:  # pixels need one image size
        raw = LogisticRegression(max_iter=2000).fit(pixels(list(train)), y_train)
        print(f"raw pixels, rotated test images (baseline): "
              f"{accuracy(raw.predict(pixels(list(rotated_test))), y_test):.3f}")  # fmt: skip
    embedder.close()

    with tempfile.TemporaryDirectory() as scratch:
        path = args.save or Path(scratch) / "pipeline.pkl"
        with path.open("wb") as f:
            pickle.dump(pipe, f)
        with path.open("rb") as f:
            restored = pickle.load(f)  # only unpickle files you trust
        size = path.stat().st_size
    again = restored.predict(rotated_test)  # connects again on first use
    same = bool(np.array_equal(again, predicted))
    print(f"pickled to {path} ({size} bytes) and loaded back: same predictions: {same}")
    restored.named_steps["embed"].close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
