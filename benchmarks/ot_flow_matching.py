"""Flow matching 8-gaussians -> moons: independent pairing vs OT coupling (vs C2OT-free W-CFM).

Trains the same small velocity MLP three ways for ``--steps`` steps (batch ``--batch``):

* ``independent``: I-CFM, noise and data paired as drawn;
* ``ot``: OT-CFM, the batch re-paired by ``couple(x0, x1, "exact")``;
* ``wcfm``: W-CFM, pairs as drawn, loss weighted by ``wcfm_weights`` (no solve).

Then it integrates each model with 1..64 Euler steps from fresh source samples and
reports, per step count, the 2-Wasserstein distance of the generated points to fresh
target samples (exact OT on ``--eval`` points, so lower is better and 0 is perfect),
plus the straightness of the learned flow (mean |x(1) - x(0)|^2 over the mean path
energy: 1.0 for straight constant-speed paths) and the training batches' transport
cost. An "image-sized" section measures how much OT lowers the transport cost of
noise -> data batches at d=3072 (no training).

Writes ``benchmarks/results/ot-flow-matching.json`` and ``.png``.

    python benchmarks/ot_flow_matching.py            # about 1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from batchlab.samplers import couple, wcfm_weights


def eight_gaussians(n: int, gen: torch.Generator, scale: float = 5.0, std: float = 0.316) -> torch.Tensor:
    """torchcfm's 8-gaussians: 8 modes on a circle of radius ``scale``."""
    k = torch.randint(0, 8, (n,), generator=gen)
    ang = k.float() * (math.pi / 4)
    centres = scale * torch.stack([ang.cos(), ang.sin()], 1)
    return centres + std * torch.randn(n, 2, generator=gen)


def moons(n: int, gen: torch.Generator, noise: float = 0.2) -> torch.Tensor:
    """sklearn's make_moons(noise=0.2) * 3 - 1, as torchcfm's ``sample_moons``."""
    t = torch.rand(n, generator=gen) * math.pi
    upper = torch.rand(n, generator=gen) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=gen)
    return pts * 3 - 1


def mlp(width: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.SELU(),
        torch.nn.Linear(width, width), torch.nn.SELU(),
        torch.nn.Linear(width, width), torch.nn.SELU(),
        torch.nn.Linear(width, 2),
    )


def train(mode: str, steps: int, batch: int, seed: int, lr: float = 1e-3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pair_cost = 0.0
    for _ in range(steps):
        x0, x1 = eight_gaussians(batch, gen), moons(batch, gen)
        w = None
        if mode == "ot":
            x1 = x1[couple(x0, x1, "exact")]
        elif mode == "wcfm":
            w = wcfm_weights(x0, x1, reg=0.5)
        pair_cost += float((x1 - x0).pow(2).sum(1).mean())
        t = torch.rand(batch, 1, generator=gen)
        xt = (1 - t) * x0 + t * x1
        err = (model(torch.cat([xt, t], 1)) - (x1 - x0)).pow(2).sum(1)
        loss = (err * w).mean() if w is not None else err.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, pair_cost / steps


@torch.no_grad()
def integrate(model, x0: torch.Tensor, n_steps: int):
    x = x0.clone()
    energy = torch.zeros(x.shape[0])
    dt = 1.0 / n_steps
    for k in range(n_steps):
        t = torch.full((x.shape[0], 1), k * dt)
        v = model(torch.cat([x, t], 1))
        energy += v.pow(2).sum(1) * dt
        x = x + dt * v
    return x, energy


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    perm = couple(a, b, "exact")
    return float((a - b[perm]).pow(2).sum(1).mean().sqrt())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    step_counts = [1, 2, 4, 8, 16, 64]
    gen = torch.Generator().manual_seed(args.seed + 100)
    src, tgt = eight_gaussians(args.eval, gen), moons(args.eval, gen)
    floor = w2(moons(args.eval, gen), tgt)  # two target samples: the sampling-noise floor
    results = {"steps": args.steps, "batch": args.batch, "eval": args.eval, "w2_floor": floor, "modes": {}}
    for mode in ("independent", "ot", "wcfm"):
        t0 = time.perf_counter()
        model, pair_cost = train(mode, args.steps, args.batch, args.seed)
        train_s = time.perf_counter() - t0
        row = {"train_seconds": train_s, "train_pair_cost": pair_cost, "w2": {}, "straightness": {}}
        for k in step_counts:
            x1, energy = integrate(model, src, k)
            row["w2"][k] = w2(x1, tgt)
            row["straightness"][k] = float((x1 - src).pow(2).sum(1).mean() / energy.mean())
        results["modes"][mode] = row
        print(f"{mode:12s} train {train_s:5.1f}s  pair cost {pair_cost:6.2f}  "
              + "  ".join(f"W2@{k}={row['w2'][k]:.3f}" for k in step_counts)
              + f"  straightness@64={row['straightness'][64]:.3f}", flush=True)

    # image-sized: transport cost of noise -> data batches at d = 3 x 32 x 32, no training
    from batchlab.datasets.synthetic import gaussian_mixture

    image = {}
    for n in (128, 512):
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(n, 3072, generator=g)
        x1, _ = gaussian_mixture(n, 3072, 10, sigma=0.5, seed=args.seed + 1, normalize=False)
        x1 = x1 / x1.std()
        ind = float((x1 - x0).pow(2).sum(1).mean())
        t0 = time.perf_counter()
        perm = couple(x0, x1, "exact")
        sec = time.perf_counter() - t0
        ot_cost = float((x1[perm] - x0).pow(2).sum(1).mean())
        image[n] = {"independent_cost": ind, "ot_cost": ot_cost, "reduction_%": 100 * (1 - ot_cost / ind),
                    "couple_seconds": sec}
        print(f"image-sized n={n}: mean |x1 - x0|^2 independent {ind:.1f}, OT {ot_cost:.1f} "
              f"({image[n]['reduction_%']:.1f}% lower), couple {sec * 1e3:.0f} ms")
    results["image_sized_d3072"] = image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ot-flow-matching.json").write_text(json.dumps(results, indent=2))
    _plot(out / "ot-flow-matching.png", results, step_counts, src, args)
    print(f"wrote {out / 'ot-flow-matching.json'} and .png")
    return 0


def _plot(path, results, step_counts, src, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for mode, row in results["modes"].items():
        axes[0].plot(step_counts, [row["w2"][k] for k in step_counts], marker="o", label=mode)
    axes[0].axhline(results["w2_floor"], color="gray", ls="--", label="sampling floor")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("Euler steps")
    axes[0].set_ylabel("W2 to target (lower is better)")
    axes[0].set_title("sample quality vs integration steps")
    axes[0].legend()
    for ax, mode in zip(axes[1:], ("independent", "ot")):
        model, _ = train(mode, args.steps, args.batch, args.seed)
        x = src[:300].clone()
        traj = [x.clone()]
        with torch.no_grad():
            for k in range(32):
                t = torch.full((x.shape[0], 1), k / 32)
                x = x + model(torch.cat([x, t], 1)) / 32
                traj.append(x.clone())
        tr = torch.stack(traj, 1)
        for i in range(tr.shape[0]):
            ax.plot(tr[i, :, 0], tr[i, :, 1], color="olive", alpha=0.15, lw=0.7)
        ax.scatter(tr[:, 0, 0], tr[:, 0, 1], s=3, c="black", label="noise (8 gaussians)")
        ax.scatter(tr[:, -1, 0], tr[:, -1, 1], s=3, c="tab:blue", label="generated (moons)")
        ax.set_title(f"{mode} pairing: learned paths (32 Euler steps)")
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
