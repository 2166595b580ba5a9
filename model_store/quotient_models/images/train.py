"""Train rotmnist_c8_v1 (self-supervised equivariant autoencoder) on CPU, then export it.

``python -m quotient_models.images.train --data data/mnist --out model_store/models/rotmnist-c8``

Each step takes a batch of training digits and two views of each: view A rotated by a random
multiple of 90 degrees (exact on the grid), view B by a fresh uniform angle in [0, 360)
(bilinear). The loss is

    BCE(decoder(encoder(v)), v) over both views
    + λ · orbit_distance²(z_A, z_B) / mean pairwise squared distance of the latents in the batch
    + μ · InfoNCE over the batch with logits −orbit_distance²(z_A_i, z_B_j) / (τ · that spread),

where orbit_distance(a, b) = min over cyclic shifts s of ‖roll(a, s) − b‖. The second term asks
the latent of a continuously rotated digit to stay on (near) the orbit of the latent of its
grid-aligned copy, relative to how far apart different digits are: exact C8 equivariance holds
only for 90-degree multiples on the pixel grid, and this is what makes the invariant projections
stable under other angles. The third (instance discrimination, as in SimCLR) asks each rotated
view to be nearer its own digit's other view than any other digit of the batch, which is what
separates near-duplicate digits (no labels are used). The validation split (rotated by its
fixed evaluation angles) is monitored every epoch. Writes ``checkpoint.pt`` and
``training.json``, then exports (export.py).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from quotient_models.images.arch_rotmnist_c8_v1 import FIELDS, ORDER, WIDTHS, RotMNISTAutoencoder
from quotient_models.images.data import eval_angles, load_mnist
from quotient_models.images.export import ARCHITECTURE, export_model, sample_inputs, save_checkpoint
from quotient_models.images.transforms import rotate

__all__ = ["orbit_consistency", "train"]


def _log(msg: str) -> None:
    tqdm.write(f"[train] {msg}", file=sys.stderr)


def orbit_distances(za: torch.Tensor, zb: torch.Tensor, order: int = ORDER) -> torch.Tensor:
    """Squared orbit distances min_s ‖roll(za_i, s) − zb_j‖² between latents [B, C*N] → [B, B]."""
    a = za.reshape(za.shape[0], -1, order)
    rolled = [torch.roll(a, s, dims=-1).flatten(1) for s in range(order)]
    sq = [(r**2).sum(1)[:, None] + (zb**2).sum(1)[None] - 2 * r @ zb.T for r in rolled]
    return torch.stack(sq).min(dim=0).values.clamp_min(0)


def _spread(z: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between latents of different digits (2 x total variance)."""
    return (2.0 * z.var(dim=0, unbiased=True).sum()).clamp_min(1e-8)


def orbit_consistency(za: torch.Tensor, zb: torch.Tensor, order: int = ORDER) -> torch.Tensor:
    """Mean squared orbit distance between paired latents [B, C*N], divided by the mean squared
    distance between latents of different digits in the batch (scale-free)."""
    return orbit_distances(za, zb, order).diagonal().mean() / _spread(za)


def instance_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Instance discrimination (InfoNCE, both directions): each view must be nearer, in orbit
    distance, to the other view of its own digit than to the other digits of the batch."""
    logits = -orbit_distances(za, zb) / (temperature * _spread(za))
    target = torch.arange(len(za))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _views(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    quarter = torch.randint(0, 4, (len(x),), generator=gen).to(torch.float64) * 90.0
    angle = torch.rand(len(x), generator=gen, dtype=torch.float64) * 360.0
    return rotate(x, quarter), rotate(x, angle)


def _losses(
    model: RotMNISTAutoencoder, x: torch.Tensor, gen: torch.Generator, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    va, vb = _views(x, gen)
    both = torch.cat([va, vb])
    z, logits = model(both)
    bce = F.binary_cross_entropy_with_logits(logits, both)
    za, zb = z[: len(x)], z[len(x) :]
    return bce, orbit_consistency(za, zb), instance_nce(za, zb, temperature)


@torch.no_grad()
def _validate(model: RotMNISTAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """BCE of the rotated validation digits, their orbit consistency with the unrotated ones, and
    the recall@1 of finding the unrotated copy by orbit distance."""
    model.eval()
    xr = rotate(x, torch.from_numpy(eval_angles("val", len(x))))
    z0 = model.latent(x)
    zr, logits = model(xr)
    bce = float(F.binary_cross_entropy_with_logits(logits, xr))
    cons = float(orbit_consistency(z0, zr))
    a = z0.reshape(len(x), -1, ORDER)
    best = torch.full((len(x), len(x)), float("inf"))
    for s in range(ORDER):
        best = torch.minimum(best, torch.cdist(zr, torch.roll(a, s, dims=-1).flatten(1)))
    recall = float((best.argmin(dim=1) == torch.arange(len(x))).float().mean())
    model.train()
    return {"bce": bce, "consistency": cons, "orbit_recall_at_1": recall}


def train(
    data_dir: str,
    out: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight: float,
    nce_weight: float,
    temperature: float,
    max_minutes: float,
    limit: int | None,
    command: str,
    fixed_steps: int | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    splits = load_mnist(data_dir)
    images = splits["train"][0]
    if limit is not None:  # an evenly spread subset: the split is ordered by class
        images = images[np.linspace(0, len(images) - 1, limit).astype(int)]
    x_train = torch.from_numpy(images[:, None].copy())
    x_val = torch.from_numpy(splits["val"][0][:, None].copy())
    model = RotMNISTAutoencoder(FIELDS, WIDTHS)
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        f"{ARCHITECTURE}: {FIELDS} fields x {ORDER}, widths {WIDTHS}, {n_params} parameters; "
        f"{len(x_train)} training digits, {epochs} epochs, batch {batch_size} digits (x2 views), "
        f"seed {seed}"
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Warm-up then cosine decay over the planned steps. When the measured pace would overrun the
    # time budget (a slow or shared CPU), the plan is shortened, and recorded, so that the learning
    # rate still anneals to zero inside the budget.
    # A fixed plan (--steps) is never shortened: the same command then gives the same weights.
    requested = fixed_steps or epochs * steps_per_epoch
    plan = {"steps": requested}

    def lr_factor(step: int) -> float:
        warm = max(1, int(0.05 * plan["steps"]))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (
            1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, plan["steps"] - warm)))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict[str, float]] = []
    start = time.monotonic()
    model.train()
    done, epoch = 0, 0
    while done < plan["steps"]:
        epoch += 1
        perm = torch.randperm(len(x_train), generator=gen)
        sums, n = np.zeros(3), 0
        steps = min(steps_per_epoch, plan["steps"] - done)
        bar = tqdm(range(steps), desc=f"epoch {epoch}", file=sys.stderr, leave=False, mininterval=5)
        for step in bar:
            x = x_train[perm[step * batch_size : (step + 1) * batch_size]]
            bce, cons, nce = _losses(model, x, gen, temperature)
            loss = bce + weight * cons + nce_weight * nce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done, n = done + 1, n + 1
            sums += (bce.item(), cons.item(), nce.item())
            bar.set_postfix(
                bce=f"{sums[0] / n:.4f}",
                cons=f"{sums[1] / n:.4f}",
                nce=f"{sums[2] / n:.3f}",
                plan=plan["steps"],
            )
            # the plan follows the average pace so far: never beyond the request, never below done
            fits = int(max_minutes * 60 / ((time.monotonic() - start) / done))
            if done >= 10 and fixed_steps is None:
                plan["steps"] = max(done, min(requested, fits))
            if done >= plan["steps"]:
                break
        bar.close()
        val = _validate(model, x_val)
        elapsed = time.monotonic() - start
        row = {
            "epoch": epoch,
            "steps_done": done,
            "train_bce": sums[0] / n,
            "train_consistency": sums[1] / n,
            "train_nce": sums[2] / n,
            **{f"val_{k}": v for k, v in val.items()},
            "lr": opt.param_groups[0]["lr"],
            "elapsed_s": elapsed,
        }
        history.append(row)
        _log(
            f"epoch {epoch} ({done}/{plan['steps']} steps): train bce {row['train_bce']:.4f} "
            f"cons {row['train_consistency']:.4f} nce {row['train_nce']:.3f} | "
            f"val bce {val['bce']:.4f} "
            f"cons {val['consistency']:.4f} "
            f"orbit-recall@1 {val['orbit_recall_at_1']:.3f} | {elapsed / 60:.1f} min"
        )
    wall = time.monotonic() - start
    model.eval()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out_dir / "checkpoint.pt")
    report = export_model(model, out_dir, sample_inputs(data_dir))
    import escnn

    info = {
        "architecture": ARCHITECTURE,
        "command": command,
        "seed": seed,
        "epochs": round(done / steps_per_epoch, 2),
        "epochs_requested": epochs,
        "steps": done,
        "steps_requested": requested,
        "fixed_plan": fixed_steps is not None,
        "shortened_for_time_budget": done < requested,
        "max_minutes": max_minutes,
        "batch_size_digits": batch_size,
        "views_per_digit": 2,
        "learning_rate": lr,
        "schedule": "Adam; 5% linear warm-up, cosine decay to 0 over the (maybe shortened) plan",
        "consistency_weight": weight,
        "nce_weight": nce_weight,
        "nce_temperature": temperature,
        "training_digits": len(x_train),
        "parameters": n_params,
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "final": history[-1],
        "history": history,
        "export": report,
        "versions": {
            "torch": torch.__version__,
            "escnn": getattr(escnn, "__version__", "?"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"done in {wall / 60:.1f} min; wrote {out_dir / 'checkpoint.pt'} and training.json")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quotient_models.images.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--data", default="data/mnist", help="prepared digits (quotient_models.images.data)"
    )
    parser.add_argument(
        "--out", default="model_store/models/rotmnist-c8", help="model directory to write"
    )
    parser.add_argument(
        "--epochs", type=int, default=6, help="passes over the 8000 training digits"
    )
    parser.add_argument("--seed", type=int, default=20261123, help="seeds torch and numpy")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="digits per step (two views each)"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument(
        "--consistency-weight", type=float, default=2.0, help="λ of the orbit-consistency term"
    )
    parser.add_argument(
        "--nce-weight", type=float, default=1.0, help="μ of the instance-discrimination term"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.05, help="τ of the instance-discrimination term"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=26.0,
        help="shorten the plan (steps) to end training within this wall time",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N training digits (smoke runs)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fixed number of optimiser steps (overrides --epochs; never shortened, so the run "
        "is reproducible; --max-minutes is then not enforced)",
    )
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore", module="escnn")
    command = "python -m quotient_models.images.train " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    train(
        args.data,
        args.out,
        args.epochs,
        args.seed,
        args.batch_size,
        args.lr,
        args.consistency_weight,
        args.nce_weight,
        args.temperature,
        args.max_minutes,
        args.limit,
        command,
        args.steps,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
