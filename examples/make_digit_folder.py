"""Write MNIST test digits as a folder of PNG files, one sub-folder per digit.

The folder layout the image examples read (``image_retrieval.py``, ``cluster_digits.py``,
``sklearn_pipeline.py``): ``OUT/<label>/<index>.png``, ``index`` the digit's position in the
test split of the repository's ``data/mnist/mnist10k.npz`` (``make data-images`` fetches it;
the split is ordered by label, so the digits are drawn at random, seeded). Run from a clone of
the repository::

    python examples/make_digit_folder.py --out digits --n 200    # 200 random test digits

It needs only numpy and Pillow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "mnist" / "mnist10k.npz"
SPLITS = ("train", "val", "test")  # the codes of the npz's "split" array, in order


def write_digits(data: Path, out: Path, n: int, split: str = "test", seed: int = 0) -> list[Path]:
    """Write ``n`` digits of ``split``, drawn at random with ``seed``, as
    ``out/<label>/<index>.png`` → their paths, by index."""
    with np.load(data, allow_pickle=False) as f:
        chosen = f["split"] == SPLITS.index(split)
        images, labels = f["images"][chosen], f["labels"][chosen]
    if not 1 <= n <= len(images):
        raise ValueError(f"--n must be between 1 and {len(images)} ({split} digits), got {n}")
    paths = []
    for index in np.sort(np.random.default_rng(seed).permutation(len(images))[:n]):
        path = out / str(int(labels[index])) / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--n", type=int, default=200, help="how many digits (default 200)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="default: test")
    parser.add_argument("--seed", type=int, default=0, help="which digits (default 0)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"default: {DATA}")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"error: {args.data} not found: run `make data-images` first", file=sys.stderr)
        return 2
    try:
        paths = write_digits(args.data, args.out, args.n, args.split, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = sorted({p.parent.name for p in paths}, key=int)
    print(f"wrote {len(paths)} {args.split} digits to {args.out}/<label>/<index>.png "
          f"(labels {', '.join(labels)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
