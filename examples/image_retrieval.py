"""Image retrieval over a folder of images, whatever their rotation.

Embeds every image under a folder with Quotient's image model (``rotmnist-c8``), stores the
vectors in a FAISS index in a folder (``quotient_client.stores``), then searches it with a
rotated copy of one of the images and prints the ranked hits: the embedding is invariant to
rotation, so the original comes first.

Run it against a running server (``make serve`` in another terminal) with the client's FAISS
extra installed (``pip install './clients/python[faiss]'``), on a folder of digits made by
``make_digit_folder.py``::

    python examples/make_digit_folder.py --out digits --n 200
    python examples/image_retrieval.py --folder digits                       # the first image
    python examples/image_retrieval.py --folder digits --query digits/7/0.png --angle 200 -k 3

``--target HOST:PORT`` (default ``$QUOTIENT_TARGET``, else ``127.0.0.1:50051``) names the
server; an API key is taken from ``$QUOTIENT_API_KEY``. Ids in the index are the images' paths
relative to the folder; each keeps its sub-folder's name as ``label`` metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from quotient_client import Client
from quotient_client.stores import open_store

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SCORES = {
    "l2": "Euclidean distance",
    "cosine": "cosine similarity",
    "inner_product": "inner product",
}


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def rotated(path: Path, angle: float) -> Image.Image:
    """The image at ``path`` turned by ``angle`` degrees counter-clockwise about its centre,
    the same size; the corners it uncovers take the colour of its border (its background)."""
    image = Image.open(path).convert("RGB")
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("QUOTIENT_TARGET", "127.0.0.1:50051"),
        help="the Quotient server, HOST:PORT (default: $QUOTIENT_TARGET or 127.0.0.1:50051)",
    )
    parser.add_argument("--folder", type=Path, required=True, help="the images to index")
    parser.add_argument("--index", type=Path, help="the index folder (default: a temporary one)")
    parser.add_argument(
        "--query", type=Path, action="append", help="an image of the folder (repeatable; "
        "default: the first one)"
    )  # fmt: skip
    parser.add_argument("--angle", type=float, default=137.0, help="degrees (default 137)")
    parser.add_argument("-k", type=int, default=5, help="hits per query (default 5)")
    args = parser.parse_args(argv)

    images = list_images(args.folder)
    if not images:
        print(f"error: no images under {args.folder}", file=sys.stderr)
        return 2
    ids = [p.relative_to(args.folder).as_posix() for p in images]
    queries = args.query or [images[0]]
    for query in queries:
        if not query.is_file():
            print(f"error: query {query}: no such file", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory() as scratch, Client(args.target) as client:
        folder = args.index or Path(scratch) / "images.index"
        embedded = client.embed(images, modality="image")  # paths: the client sends their bytes
        labels = [{"label": p.parent.name} if p.parent != args.folder else None for p in images]
        with open_store(folder) as store:
            store.upsert(ids, embedded, labels)
            print(f"indexed {len(store)} images of {args.folder} into {folder}")
            print(f"  {embedded.spec.label()}")
            turned = client.embed(
                [rotated(q, args.angle) for q in queries], model=embedded.spec.model
            )
            results = store.search(turned, k=args.k)
            order = "larger" if store.higher_is_better else "smaller"
            print(f"score = {SCORES[embedded.spec.metric]} ({order} is nearer)")

    indexed = {p.resolve() for p in images}
    for query, hits in zip(queries, results, strict=True):
        original = query.resolve()
        print(f"\nquery {query} turned by {args.angle:g} degrees")
        rank = None
        for n, hit in enumerate(hits, start=1):
            same = (args.folder / hit.id).resolve() == original
            rank = n if same and rank is None else rank
            label = (hit.metadata or {}).get("label", "")
            print(f"  {n:2d}. {hit.id:<30} {hit.score:8.4f}  {label}{'  <- the original' * same}")
        if original not in indexed:
            print("  -> (the query is not an image of the folder)")
        else:
            print(f"  -> the original is at {f'rank {rank}' if rank else f'no rank <= {args.k}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
