"""Check the variant zoo's claims (issue 6) on ground-truth worlds; prints numbers over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/variant_claims.py [--steps 800] [--seeds 2] [--jobs 2]

Each claim is run as stated, with the worlds fixed in advance (not tuned until a claim passes):
1. Matryoshka absorbs less than BatchTopK at the same L0 in a hierarchical world.
2. Tokenized beats TopK at equal L0 on a world whose activations have a per-token mean.
3. Switch reaches similar FVU to a dense TopK of the same total width with fewer encoder FLOPs.
4. p-annealing reaches lower L0 than L1 at the same FVU.
5. Archetypal dictionaries are more stable across seeds (matched decoder cosine) than TopK.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics

import numpy as np
import torch

WORLD = {"n_features": 256, "d": 64, "firing_prob": 0.02, "magnitude_std": 0.2}
TRAIN = {"lr_warmup_steps": 50, "sparsity_warmup_steps": 100, "progress": False}


class HierarchySource:
    """32 parents, each with 4 children; a child can fire only when its parent fires (chanind-style).
    Parent p fires w.p. 0.06; given the parent, each child fires w.p. 0.3. Directions are random unit
    vectors in 64-d (child directions independent of the parent's)."""

    def __init__(self, seed: int, batch: int = 1024):
        g = torch.Generator().manual_seed(123)
        self.n_par, self.n_child = 32, 4
        n = self.n_par * (1 + self.n_child)
        d = torch.randn(n, 64, generator=g)
        self.directions = d / d.norm(dim=1, keepdim=True)
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.d_in, self.position = batch, 64, 0

    def __iter__(self):
        return self

    def sample(self, b):
        par = (torch.rand(b, self.n_par, generator=self.gen) < 0.06).float()
        child = (torch.rand(b, self.n_par, self.n_child, generator=self.gen) < 0.3).float() * par[..., None]
        feats = torch.cat([par, child.reshape(b, -1)], 1)
        mags = 1 + 0.2 * torch.randn(feats.shape, generator=self.gen)
        feats = feats * mags.clamp_min(0)
        return feats

    def __next__(self):
        from saelab.activations.base import Batch

        self.position += 1
        f = self.sample(self.batch)
        return Batch(x=f @ self.directions, features=f)

    def state_dict(self):
        return {"generator": self.gen.get_state(), "position": torch.tensor(self.position)}

    def load_state_dict(self, s):
        self.gen.set_state(s["generator"])
        self.position = int(s["position"])


def absorption(sae, src: HierarchySource, n: int = 20000) -> dict:
    """For each parent, its best-matching latent (decoder cosine). Absorption = P(that latent is off |
    parent on and some child on) minus P(off | parent on, no child): how much children steal it."""
    feats = src.sample(n)
    x = feats @ src.directions
    with torch.no_grad():
        f = sae.eval().encode(x)
    dec = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = dec @ src.directions[: src.n_par].t()  # [d_sae, n_par]
    best = cos.argmax(0)
    par = feats[:, : src.n_par] > 0
    child_any = (feats[:, src.n_par :].reshape(n, src.n_par, src.n_child) > 0).any(-1)
    rates, base, match = [], [], []
    for p in range(src.n_par):
        on = f[:, best[p]] > 0
        with_child, alone = par[:, p] & child_any[:, p], par[:, p] & ~child_any[:, p]
        if with_child.sum() > 20 and alone.sum() > 20:
            rates.append(float((~on[with_child]).float().mean()))
            base.append(float((~on[alone]).float().mean()))
            match.append(float(cos[best[p], p]))
    return {
        "absorption": statistics.mean(r - b for r, b in zip(rates, base)),
        "miss_with_child": statistics.mean(rates),
        "parent_cos": statistics.mean(match),
    }


def fvu_l0(sae, batches) -> dict:
    from saelab.evals.core import reconstruction_metrics

    m = reconstruction_metrics(sae, batches)
    return {"fvu": m.fvu, "l0": m.l0}


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(a.detach(), dim=1)
    b = torch.nn.functional.normalize(b.detach(), dim=1)
    cos = (a @ b.t()).numpy()
    r, c = linear_sum_assignment(-cos)
    return float(cos[r, c].mean())


def job(spec: dict) -> dict:
    torch.set_num_threads(1)
    import saelab
    from saelab.activations.factory import build_source
    from saelab.toys import ToySource, World

    claim, cfg, seed, steps = spec["claim"], spec["sae"], spec["seed"], spec["steps"]
    tc = {**TRAIN, "steps": steps, "seed": seed}
    if claim == "matryoshka":
        src = HierarchySource(seed)
        r = saelab.train(cfg, src, tc)
        rec = absorption(r.sae, HierarchySource(seed + 999))
        rec.update(fvu_l0(r.sae, [next(HierarchySource(seed + 555)) for _ in range(4)]))
    elif claim == "tokenized":
        spec_src = {"type": "toy_tokens", "world": WORLD, "vocab_size": 64, "mean_norm": 1.0, "batch_size": 1024}
        r = saelab.train(cfg, build_source({**spec_src, "seed": seed}), tc)
        rec = fvu_l0(r.sae, [next(build_source({**spec_src, "seed": seed + 7919})) for _ in range(4)])
    else:
        r = saelab.train(cfg, ToySource(World(WORLD), 1024, seed), tc)
        held = ToySource(World(WORLD), 1024, seed + 7919)
        rec = fvu_l0(r.sae, [next(held) for _ in range(4)])
        if claim == "switch" and hasattr(r.sae, "flops_per_token"):
            rec["encoder_flops"] = r.sae.flops_per_token()["router"] + r.sae.flops_per_token()["encoder"]
        elif claim == "switch":
            rec["encoder_flops"] = 2 * cfg["d_in"] * cfg["d_sae"]
        if claim == "stability":
            rec["W_dec"] = r.sae.W_dec.detach().clone().tolist()
    return {**spec, **rec, "train_seconds": r.seconds}


def plan(steps: int, seeds: int) -> list[dict]:
    base = {"d_in": 64, "d_sae": 256}
    jobs = []
    for s in range(seeds):
        for arch in ("batchtopk", "matryoshka"):
            jobs.append({"claim": "matryoshka", "sae": {**base, "d_sae": 160, "architecture": arch, "k": 3, "seed": s}})
        for arch in ("topk", "tokenized"):
            jobs.append(
                {
                    "claim": "tokenized",
                    "sae": {
                        **base,
                        "architecture": arch,
                        "k": 5,
                        "seed": s,
                        **({"vocab_size": 64} if arch == "tokenized" else {}),
                    },
                }
            )
        jobs.append({"claim": "switch", "sae": {**base, "architecture": "topk", "k": 5, "seed": s}})
        jobs.append({"claim": "switch", "sae": {**base, "architecture": "switch", "k": 5, "n_experts": 4, "seed": s}})
        for arch in ("topk", "archetypal"):
            jobs.append({"claim": "stability", "sae": {**base, "architecture": arch, "k": 5, "seed": s}})
    for lam in (1.5, 3.0, 6.0):  # a small sweep each, to compare L0 at matched FVU
        jobs.append({"claim": "panneal", "sae": {**base, "architecture": "relu", "l1_coefficient": lam, "seed": 0}})
        jobs.append(
            {"claim": "panneal", "sae": {**base, "architecture": "relu_panneal", "l1_coefficient": lam, "seed": 0}}
        )
    for j in jobs:
        j["seed"], j["steps"] = j["sae"]["seed"], steps
    return jobs


def l0_at_fvu(points: list[tuple[float, float]], target: float) -> float:
    """Interpolate log L0 against log FVU along a sweep."""
    pts = sorted(points)
    fv = np.log([p[0] for p in pts])
    l0 = np.log([p[1] for p in pts])
    order = np.argsort(fv)
    return float(np.exp(np.interp(np.log(target), fv[order], l0[order])))


def summarise(results: list[dict]) -> dict:
    out = {}

    def by(claim, arch, key):
        return [r[key] for r in results if r["claim"] == claim and r["sae"]["architecture"] == arch]

    def ms(v):
        return f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f} (n={len(v)})"

    out["1 matryoshka absorption"] = {
        a: {
            "absorption": ms(by("matryoshka", a, "absorption")),
            "l0": ms(by("matryoshka", a, "l0")),
            "fvu": ms(by("matryoshka", a, "fvu")),
        }
        for a in ("batchtopk", "matryoshka")
    }
    out["2 tokenized fvu at equal k"] = {
        a: {"fvu": ms(by("tokenized", a, "fvu")), "l0": ms(by("tokenized", a, "l0"))} for a in ("topk", "tokenized")
    }
    out["3 switch vs dense topk"] = {
        a: {"fvu": ms(by("switch", a, "fvu")), "encoder_flops": by("switch", a, "encoder_flops")[0]}
        for a in ("topk", "switch")
    }
    stab = {}
    for a in ("topk", "archetypal"):
        decs = [
            torch.tensor(r["W_dec"]) for r in results if r["claim"] == "stability" and r["sae"]["architecture"] == a
        ]
        pairs = [matched_cosine(decs[i], decs[j]) for i in range(len(decs)) for j in range(i + 1, len(decs))]
        stab[a] = {"matched_cos": ms(pairs) if pairs else "n/a", "fvu": ms(by("stability", a, "fvu"))}
    out["5 stability across seeds"] = stab
    relu = [(r["fvu"], r["l0"]) for r in results if r["claim"] == "panneal" and r["sae"]["architecture"] == "relu"]
    pan = [
        (r["fvu"], r["l0"]) for r in results if r["claim"] == "panneal" and r["sae"]["architecture"] == "relu_panneal"
    ]
    lo = max(min(p[0] for p in relu), min(p[0] for p in pan))
    hi = min(max(p[0] for p in relu), max(p[0] for p in pan))
    common = [float(np.exp(t)) for t in np.linspace(np.log(lo), np.log(hi), 3)] if lo < hi else []
    out["4 p-annealing vs L1"] = {
        "relu (fvu, l0)": relu,
        "relu_panneal (fvu, l0)": pan,
        "l0 at common fvu": [{"fvu": t, "relu": l0_at_fvu(relu, t), "panneal": l0_at_fvu(pan, t)} for t in common],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="Optional JSON file for the summary.")
    args = ap.parse_args()
    jobs = plan(args.steps, args.seeds)
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(job, jobs))
    summary = summarise(results)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
