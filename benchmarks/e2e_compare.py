"""Local vs e2e vs e2e+ds TopK SAEs of the same k (same L0) at one hookpoint of a real model.

Trains the three on the same text for the same steps, then splices each into the model on
held-out rows and prints the `saelab.evals.e2e` table (CE increase, KL(p_clean || p_sae), L0, alive
latents, explained variance at the hookpoint and downstream) with wall times; writes
OUT/results.json and OUT/report.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/e2e_compare.py --steps 40 --out runs/e2e_compare

Defaults: SmolLM2-135M (`smollm2`, offline), model.layers.15, downstream model.layers.20 and .25.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import saelab
from saelab.evals.e2e import e2e_report, to_markdown
from saelab.models import ModelSource, load_model
from saelab.models.text import TokenRows, load_texts, special_ids


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hookpoint", default="model.layers.15")
    ap.add_argument("--downstream", nargs="*", default=["model.layers.20", "model.layers.25"])
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=4, help="token rows per step")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ds-coefficient", type=float, default=1.0)
    ap.add_argument("--out", default="runs/e2e_compare")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    timings = {"load_s": time.perf_counter() - t0}
    texts = load_texts("pydoc")
    sae_cfg = {"architecture": "topk", "d_sae": args.d_sae, "k": args.k}
    train = {
        "steps": args.steps,
        "lr": args.lr,
        "lr_warmup_steps": max(1, args.steps // 10),
        "norm_estimation_batches": 2,
        "log_every": max(1, args.steps // 4),
        "progress": False,
    }
    rows = {"context_size": args.context, "rows_per_batch": args.rows}
    saes = {}

    t = time.perf_counter()
    src = ModelSource(
        model,
        tok,
        texts,
        args.hookpoint,
        context_size=args.context,
        model_batch_size=args.rows,
        batch_size=args.rows * (args.context - 1),
        buffer_tokens=8 * args.rows * (args.context - 1),
        repeat=True,
    )
    saes["local"] = saelab.train({**sae_cfg, "d_in": src.d_in}, src, train).sae
    timings["local_s"] = time.perf_counter() - t
    for name, objective in (
        ("e2e", "e2e"),
        ("e2e+ds", {"downstream": args.downstream, "downstream_coefficient": args.ds_coefficient}),
    ):
        t = time.perf_counter()
        saes[name] = saelab.train_e2e(
            sae_cfg, model, tok, texts, args.hookpoint, {**train, "objective": objective}, **rows
        ).sae
        timings[f"{name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    held = TokenRows(texts, tok, args.context)
    for _ in range(args.steps * 2 + 16):  # past the rows training read (text order, no repeat)
        held.next_rows(args.rows)
    batches = [b for b in (held.next_rows(args.rows) for _ in range(args.eval_batches)) if b is not None]
    report = e2e_report(saes, model, args.hookpoint, batches, args.downstream, special_ids(tok))
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    table = to_markdown(report)
    setting = (
        f"{args.model} {args.hookpoint}, TopK d_sae={args.d_sae} k={args.k}, {args.steps} steps of {args.rows}x"
        f"{args.context} tokens, lr {args.lr}, torch threads {torch.get_num_threads()}"
    )
    text = f"{setting}\n\n{table}\nwall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n"
    print(text)
    (out / "report.md").write_text(text)
    result = {"setting": vars(args), "rows": [r.to_dict() for r in report], "timings": timings}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
