"""Dead-latent revival and JumpReLU convergence on a Zipf-rate world saelab does not tune for.

512 features whose firing rates are spaced geometrically from 0.03 down to 0.002 (true L0 about
5.3) in 96 dimensions; d_sae 512, batch 1024. Prints, per architecture: the L0, FVU and recovered
fraction on held-out data, the fraction of latents dead there (never firing on the held-out
tokens), and what the training log says about revival and the sparsity controller.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/revival.py --steps 3000 --seeds 0 1 2 \
        --target-l0 5.3 topk batchtopk matryoshka jumprelu

Each line also says which features are not recovered (by quarter of the firing-rate ranking,
most frequent first) and which features the dead latents' decoder rows point closest to.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saelab.evals.summary import evaluate
from saelab.toys.features import ToySource
from saelab.toys.worlds import World
from saelab.train.trainer import train


def zipf_world(n: int = 512, d: int = 96, hi: float = 0.03, lo: float = 0.002, seed: int = 0) -> World:
    world = World({"kind": "independent", "n_features": n, "d": d, "seed": seed})
    probs = torch.logspace(torch.log10(torch.tensor(hi)), torch.log10(torch.tensor(lo)), n)
    world.sampler.probs = world.probs = probs
    return world


def quarters(index: torch.Tensor, n: int) -> list[int]:
    """How many of `index` (feature indices, sorted by falling rate) fall in each quarter of n."""
    return [int(((index >= q * n // 4) & (index < (q + 1) * n // 4)).sum()) for q in range(4)]


def diagnose(sae, batches, world) -> str:
    x = torch.cat([b.x for b in batches])
    with torch.no_grad():
        dead = (sae.encode(x) != 0).sum(0) == 0
        rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = rows @ (world.directions / world.directions.norm(dim=1, keepdim=True)).T
    n = cos.shape[1]
    missed = (cos.max(0).values < 0.9).nonzero().squeeze(1)
    return (
        f"unrecovered by rate quarter {quarters(missed, n)} "
        f"dead rows' nearest feature by quarter {quarters(cos.max(1).indices[dead], n)}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("archs", nargs="+")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="world and SAE seed (each)")
    p.add_argument("--target-l0", type=float, default=None, help="target_l0 of the penalty families")
    p.add_argument("--sae", default="{}", help="JSON overrides for every SAE config")
    p.add_argument("--train", default="{}", help="JSON overrides for the training config")
    p.add_argument("--no-resample", action="store_true", help="TopK-style SAEs revive by AuxK alone")
    args = p.parse_args()
    for seed in args.seeds:
        world = zipf_world(seed=seed)
        held = ToySource(world, batch_size=1024, seed=10_000 + seed)
        batches = [next(held) for _ in range(8)]
        for arch in args.archs:
            cfg = {"architecture": arch, "d_in": 96, "d_sae": 512, "seed": seed, **json.loads(args.sae)}
            if arch in ("topk", "batchtopk", "matryoshka"):
                cfg.setdefault("k", 5)
                cfg.setdefault("resample_dead", not args.no_resample)
            elif args.target_l0 is not None:
                cfg.setdefault("target_l0", args.target_l0)
            t0 = time.perf_counter()
            tcfg = {"steps": args.steps, "progress": False, "seed": seed, "log_every": 100, **json.loads(args.train)}
            res = train(cfg, ToySource(world, batch_size=1024, seed=seed), tcfg)
            rec = evaluate(res.sae, batches, world)
            last = res.history[-1]
            extra = {k: last[k] for k in ("revived_total", "l0_coefficient") if k in last}
            print(
                f"{arch:11s} seed {seed} L0 {rec.reconstruction.l0:5.2f} FVU {rec.reconstruction.fvu:.3f} "
                f"recovered {rec.ground_truth.recovery.recovered_fraction:.3f} "
                f"dead(held-out) {rec.density.dead_fraction:.3f} dead(train) {last['dead_fraction']:.3f} "
                f"{extra} {diagnose(res.sae, batches, world)} {time.perf_counter() - t0:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
