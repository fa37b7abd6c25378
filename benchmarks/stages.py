"""Stage-wise model diffing measured against ground truth: the tiny pair's planted trigger and the
diff_world's feature categories (numbers in docs/results/stages.md).

    python benchmarks/stages.py pair --seeds 0 1 2          # pair seed = dictionary seed
    python benchmarks/stages.py world --seeds 0 1 2

pair: a TopK SAE on `model.layers.1` of the tiny base / fine-tuned pair (`saelab.models.pair`),
base data = grammar text, fine-tune data = the same with 30% triggered documents. A latent is
*planted* when at least half of its firings in F_via_D (fine-tuned model, held-out fine-tune text)
are on planted positions (a trigger to the end of its document) and it fires at least 20 times.
Reported per transition: the fraction of planted latents and of the other alive latents whose
decoder (and encoder) cosine lies below the control's null.

world: the diff_world's four stage sources (`stage: model/data`); each latent of the later stage
is labelled by the true feature its decoder row matches (cosine > 0.9 with that model's part).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saelab.diffing.stages import TRANSITIONS, train_stages

HP = "model.layers.1"


def pair_run(seed: int, steps: int, stage_steps: int, d_sae: int, k: int) -> dict:
    from saelab.models.pair import make_pair
    from saelab.models.source import Harvester, ModelSource
    from saelab.models.text import keep_mask, special_ids

    pair = make_pair(seed)
    models = {"base": pair.base, "ft": pair.ft}
    texts = {"base": pair.texts(400, triggered=0.0, seed=1), "ft": pair.texts(400, triggered=0.3, seed=1)}

    def source(model: str, data: str):
        return ModelSource(
            models[model], pair.tokenizer, texts[data], hookpoint=HP, batch_size=256, buffer_tokens=4096,
            repeat=True, context_size=32, seed=seed,
        )  # fmt: skip

    sources = {f"{m}/{d}": source(m, d) for m in ("base", "ft") for d in ("base", "ft")}
    cfg = {"architecture": "topk", "d_in": 64, "d_sae": d_sae, "k": k}
    result = train_stages(
        cfg, sources, steps=steps, stage_steps=stage_steps, train={"progress": False, "lr": 3e-3}, seed=seed
    )
    ids, mask = pair.encode(pair.texts(200, 0.3, seed=99))
    keep = keep_mask(ids, mask, special_ids(pair.tokenizer))
    planted = pair.planted_mask(ids)[keep]
    acts = Harvester(pair.ft, pair.tokenizer, ["x"], HP).harvest_rows(ids, mask)[HP]
    marked = {}
    for final in ("F_via_D", "F_via_M"):
        with torch.no_grad():
            fires = result.saes[final].encode(acts) > 0
        n = fires.sum(0)
        precision = (fires & planted[:, None]).sum(0) / n.clamp_min(1)
        marked[final] = (precision >= 0.5) & (n >= 20)
    return {"seed": seed, "planted_token_fraction": float(planted.float().mean())} | _rates(result, marked)


def _rates(result, marked: dict[str, torch.Tensor], label: str = "planted") -> dict:
    """Per transition and kind: the fraction beyond the null among the marked latents of the F
    stage the transition's path reaches (the control: F_via_D's) and among other alive latents."""
    out = {"null": {k: result.null(k) for k in ("encoder", "decoder")}, "rates": {}}
    out |= {f"n_{label}_{final}": int(m.sum()) for final, m in marked.items()}
    for name, (_, b) in TRANSITIONS.items():
        mark = marked["F_via_M" if name in ("S->M", "M->F_via_M") else "F_via_D"]
        alive = result.alive(b)
        cos = result.cosines(*TRANSITIONS[name])
        row = {}
        for kind in ("encoder", "decoder"):
            beyond = cos[kind] < result.null(kind)
            for group, mask in ((label, mark & alive), ("other", ~mark & alive)):
                row[f"{kind}_{group}"] = float(beyond[mask].float().mean()) if mask.any() else None
                row[f"n_{group}"] = int(mask.sum())
        out["rates"][name] = row
    return out


def world_run(seed: int, steps: int, stage_steps: int, d_sae: int, k: int) -> dict:
    from saelab.diffing.world import DiffWorld
    from saelab.evals.core import unit_rows

    world = {"d": 32, "seed": seed}
    keys = ("base/base", "base/ft", "ft/base", "ft/ft")
    sources = {s: {"type": "diff_world", "world": world, "stage": s, "batch_size": 512, "seed": seed} for s in keys}
    cfg = {"architecture": "topk", "d_in": 32, "d_sae": d_sae, "k": k}
    result = train_stages(
        cfg, sources, steps=steps, stage_steps=stage_steps, train={"progress": False, "lr": 3e-3}, seed=seed
    )
    truth = DiffWorld(world)
    out = {"seed": seed, "null": {k: result.null(k) for k in ("encoder", "decoder")}, "rates": {}}
    for name, (_, b) in TRANSITIONS.items():
        part = truth.parts["ft" if b in ("M", "F_via_D", "F_via_M") else "base"]
        sims = unit_rows(result.saes[b].W_dec.detach()) @ unit_rows(part).t()
        best, idx = sims.max(1)
        cos = result.cosines(*TRANSITIONS[name])
        row = {}
        for cat in ("shared", "ft_only", "rescaled", "recombined", "base_only"):
            m = result.alive(b) & (best > 0.9) & torch.tensor([truth.categories[i] == cat for i in idx.tolist()])
            if m.any():
                row[cat] = {
                    "n": int(m.sum()),
                    **{
                        kind: float((cos[kind][m] < result.null(kind)).float().mean())
                        for kind in ("encoder", "decoder")
                    },
                }
        out["rates"][name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["pair", "world"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="S steps (default: pair 600, world 600).")
    p.add_argument("--stage-steps", type=int, default=None, help="Steps of each later stage (default: 300).")
    p.add_argument("--d-sae", type=int, default=None, help="Latents (default: pair 256, world 128).")
    p.add_argument("--k", type=int, default=None, help="TopK k (default: pair 8, world 4).")
    args = p.parse_args()
    run = pair_run if args.what == "pair" else world_run
    d_sae = args.d_sae or (256 if args.what == "pair" else 128)
    k = args.k or (8 if args.what == "pair" else 4)
    for seed in args.seeds:
        t0 = time.perf_counter()
        rec = run(seed, args.steps or 600, args.stage_steps or 300, d_sae, k)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
