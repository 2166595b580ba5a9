"""Cluster a folder of digit images by their embeddings and draw the clusters to a PNG.

Embeds every image under a folder (``OUT/<label>/<name>.png``, as ``make_digit_folder.py``
writes) with Quotient's image model, optionally turning each one by a random angle first
(``--rotate``), clusters the embeddings with k-means under the model's metric
(``quotient_client.cluster.kmeans``) and prints the adjusted Rand index (ARI) of the clusters
against the sub-folder labels, next to k-means on the raw pixels. The plot (``--plot``) shows
the embeddings in 2-D (PCA), each digit drawn as its label in its cluster's colour; a
cluster x label table; and a strip of digits drawn from each cluster.

Run it against a running server (``make serve`` in another terminal), with the client's FAISS
and scikit-learn extras and matplotlib (``pip install './clients/python[faiss,sklearn]'
matplotlib``)::

    python examples/make_digit_folder.py --out digits --n 200
    python examples/cluster_digits.py --folder digits --plot clusters.png
    python examples/cluster_digits.py --folder digits --rotate --k 10 --plot rotated.png

``--target HOST:PORT`` (default ``$QUOTIENT_TARGET``, else ``127.0.0.1:50051``) names the
server; an API key is taken from ``$QUOTIENT_API_KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from quotient_client import Client, Embeddings
from quotient_client.cluster import Clustering, kmeans

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
THUMBS = 12  # digits shown per cluster


def read_folder(folder: Path, rotate: bool, seed: int) -> tuple[list[Image.Image], list[str]]:
    """The images under ``folder`` as grayscale PIL images (each turned by a random angle with
    ``rotate``) and their labels (the name of the sub-folder each is in)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    rng = np.random.default_rng(seed)
    images = []
    for path in paths:
        image = Image.open(path).convert("L")
        if rotate:  # about the centre; the uncovered corners are black (MNIST's background)
            image = image.rotate(rng.uniform(0, 360), resample=Image.Resampling.BICUBIC)
        images.append(image)
    return images, [p.parent.name for p in paths]


def pca_2d(embeddings: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """The rows projected on their first two principal axes (unit rows first under "cosine",
    the geometry k-means used) → coordinates [n, 2] and the share of variance of each axis."""
    x = embeddings.vectors.astype(np.float64)
    if embeddings.spec.metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, (s[:2] ** 2) / (s**2).sum()


def plot(
    path: Path,
    embeddings: Embeddings,
    clusters: Clustering,
    images: list[Image.Image],
    labels: list[str],
    title: str,
) -> None:
    """Write the three panels (PCA scatter, cluster x label table, digits of each cluster)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    names = sorted(set(labels), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
    table = np.zeros((clusters.n_clusters, len(names)), np.int64)
    for cluster, label in zip(clusters.labels, labels, strict=True):
        table[cluster, names.index(label)] += 1
    order = np.lexsort((-table.max(axis=1), table.argmax(axis=1)))  # by majority label
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))  # cluster -> its row in the table and the strip
    colours = plt.get_cmap("tab10" if clusters.n_clusters <= 10 else "tab20")

    rng = np.random.default_rng(0)
    fig = plt.figure(figsize=(16, 9), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 1.15), height_ratios=(1.25, 1))
    fig.suptitle(title, fontsize=13)

    ax = fig.add_subplot(grid[0, 0])
    xy, share = pca_2d(embeddings)
    for (x, y), cluster, label in zip(xy, clusters.labels, labels, strict=True):
        ax.text(x, y, label, color=colours(rank[cluster] % colours.N), fontsize=8,
                fontweight="bold", ha="center", va="center")  # fmt: skip
    pad = 0.05 * (xy.max(axis=0) - xy.min(axis=0))
    ax.set_xlim(xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0])
    ax.set_ylim(xy[:, 1].min() - pad[1], xy[:, 1].max() + pad[1])
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%})")
    ax.set_title("embeddings (PCA): each digit is its label, coloured by its k-means cluster")

    ax = fig.add_subplot(grid[1, 0])
    shown = table[order]
    ax.imshow(shown, cmap="Blues", aspect="auto")
    for (row, col), count in np.ndenumerate(shown):
        if count:
            dark = count > shown.max() / 2
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(order)), [f"cluster {r}" for r in range(len(order))], fontsize=8)
    for tick, cluster in zip(ax.get_yticklabels(), order, strict=True):
        tick.set_color(colours(rank[cluster] % colours.N))
    ax.set_xlabel("label (sub-folder)")
    ax.set_title("how many digits of each label fall in each cluster")

    ax = fig.add_subplot(grid[:, 1])
    size, gap = 28, 2
    strip = np.full((len(order) * (size + gap), THUMBS * (size + gap)), 255, np.uint8)
    for row, cluster in enumerate(order):
        members = np.flatnonzero(clusters.labels == cluster)
        members = np.sort(rng.permutation(members)[:THUMBS])  # a sample, not the first label's
        for col, member in enumerate(members):
            thumb = 255 - np.asarray(images[member].resize((size, size)), np.uint8)  # ink dark
            top, left = row * (size + gap), col * (size + gap)
            strip[top : top + size, left : left + size] = thumb
    ax.imshow(strip, cmap="gray", vmin=0, vmax=255)
    ax.set_yticks(
        [r * (size + gap) + size / 2 for r in range(len(order))],
        [f"cluster {r} ({clusters.sizes()[c]})" for r, c in enumerate(order)],
        fontsize=8,
    )
    for tick, cluster in zip(ax.get_yticklabels(), order, strict=True):
        tick.set_color(colours(rank[cluster] % colours.N))
    ax.set_xticks([])
    ax.set_title(f"{THUMBS} digits drawn from each cluster (its size)")

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    parser.add_argument("--k", type=int, help="clusters (default: the number of labels)")
    parser.add_argument("--rotate", action="store_true", help="turn each digit by a random angle")
    parser.add_argument("--seed", type=int, default=0, help="angles and k-means starts")
    parser.add_argument("--projection", help="default: the model's default projection")
    parser.add_argument("--plot", type=Path, default=Path("clusters.png"), help="the PNG to write")
    args = parser.parse_args(argv)

    images, labels = read_folder(args.folder, args.rotate, args.seed)
    if len(images) < 2:
        print(f"error: {args.folder} holds {len(images)} images; clustering needs 2 or more",
              file=sys.stderr)  # fmt: skip
        return 2
    k = args.k or len(set(labels))
    if not 1 <= k <= len(images):
        print(f"error: --k must be between 1 and {len(images)}, got {k}", file=sys.stderr)
        return 2

    with Client(args.target) as client:
        embeddings = client.embed(images, modality="image", projection=args.projection)
    clusters = kmeans(embeddings, k, seed=args.seed)
    ari = adjusted_rand_score(labels, clusters.labels)
    turned = "randomly rotated " if args.rotate else ""
    print(f"embedded {len(images)} {turned}images: {embeddings.spec.label()}")
    print(f"k-means, k={k}: cluster sizes {sorted(clusters.sizes().tolist(), reverse=True)}")
    print(f"ARI against the folder labels: {ari:.3f} (0 is chance, 1 is the labels exactly)")
    if len({image.size for image in images}) == 1:  # a pixel baseline needs one image size
        pixels = np.stack([np.asarray(i, np.float32).ravel() / 255 for i in images])
        baseline = adjusted_rand_score(labels, kmeans(pixels, k, seed=args.seed).labels)
        print(f"ARI of k-means on the raw pixels: {baseline:.3f}")

    title = (f"k-means (k={k}) of {len(images)} {turned}digits embedded by "
             f"{embeddings.spec.label()}: ARI {ari:.3f}")  # fmt: skip
    plot(args.plot, embeddings, clusters, images, labels, title)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
