"""Local vs e2e vs e2e+ds TopK SAEs of the same k (same L0) at one hookpoint of a real model.

Trains the three on the same text for the same steps, then splices each into the model on
held-out rows and prints the `saelab.evals.e2e` table (CE increase, KL(p_clean || p_spliced), L0, alive
latents, explained variance at the hookpoint and downstream) with wall times; writes
OUT/results.json and OUT/report.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/e2e_compare.py --steps 40 --out runs/e2e_compare

Defaults: SmolLM2-135M (`smollm2`, offline), model.layers.15, downstream model.layers.20 and .25.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import saelab
from saelab.evals.e2e import e2e_report, to_markdown
from saelab.io.atomic import write_json, write_text
from saelab.models import ModelSource, load_model
from saelab.models.text import TokenRows, load_texts, special_ids


def time_steps(model, tok, texts, hookpoint, sae_cfg, rows: dict, reps: int = 3) -> dict:
    """Median seconds of the parts of one e2e step, and how far the step is from its floor.

    - `clean_s`: the source's clean forward (no grad, full model: x, targets, clean log-probs).
    - `spliced_s`: the objective (SAE, spliced forward, KL) plus the backward.
    - `prefix_s`: a no-grad forward stopped after the hookpoint. The spliced forward recomputes these
      layers, and skipping them is the only saving left.
    - `floor_ratio`: (clean + spliced) / (clean + spliced - prefix), the step against its floor
      (one clean forward, one spliced forward from the hookpoint on, a backward through the rest).
    - `local_s`: a local SAE step (train_forward + backward) on the same x.
    """
    import statistics

    from saelab.models import hooks
    from saelab.sae.base import StepContext
    from saelab.train.e2e import E2EObjective, E2ESource

    source = E2ESource(model, tok, texts, hookpoint, **rows)
    objective = E2EObjective(model, hookpoint, {})
    sae = saelab.create({**sae_cfg, "d_in": source.d_in})
    parts = {"clean_s": [], "spliced_s": [], "prefix_s": [], "local_s": []}
    try:
        for _ in range(reps):
            t = time.perf_counter()
            batch = next(source)
            parts["clean_s"].append(time.perf_counter() - t)
            ctx = StepContext(batch=batch, target=batch.x)
            t = time.perf_counter()
            objective(sae, batch.x, ctx).loss.backward()
            parts["spliced_s"].append(time.perf_counter() - t)
            sae.zero_grad(set_to_none=True)
            rows_ = batch.context
            t = time.perf_counter()
            hooks.run(model, rows_.input_ids, [source.hookpoint], rows_.attention_mask)
            parts["prefix_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sae.train_forward(batch.x, StepContext(batch=batch, target=batch.x)).loss.backward()
            parts["local_s"].append(time.perf_counter() - t)
            sae.zero_grad(set_to_none=True)
    finally:
        objective.release()
    med = {k: statistics.median(v) for k, v in parts.items()}
    step = med["clean_s"] + med["spliced_s"]
    return {**med, "step_s": step, "floor_ratio": step / max(step - med["prefix_s"], 1e-9)}


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
    ap.add_argument("--time-only", action="store_true", help="only time the parts of an e2e step (3 reps)")
    ap.add_argument("--skip-timing", action="store_true", help="skip timing the parts of a step (saves ~3 steps)")
    args = ap.parse_args(argv)
    out = Path(args.out)

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
    step = {} if args.skip_timing else time_steps(model, tok, texts, args.hookpoint, sae_cfg, rows)
    print("e2e step parts (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in step.items()))
    if args.time_only:
        return {"step": step}
    # held-out rows: the last eval_batches x rows rows of the text, which training (text order,
    # steps x rows rows plus the norm estimate) must not reach
    n_rows = 0
    counter = TokenRows(texts, tok, args.context)
    while (b := counter.next_rows(64)) is not None:
        n_rows += len(b[0])
    n_eval = args.eval_batches * args.rows
    if (args.steps + 8) * args.rows > n_rows - n_eval:
        raise SystemExit(
            f"{args.steps} steps of {args.rows} rows would read into the {n_eval} held-out rows of the "
            f"{n_rows} the text has; use fewer steps or rows"
        )
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
    print(f"local: {timings['local_s']:.0f} s", flush=True)
    for name, objective in (
        ("e2e", "e2e"),
        ("e2e+ds", {"downstream": args.downstream, "downstream_coefficient": args.ds_coefficient}),
    ):
        t = time.perf_counter()
        saes[name] = saelab.train_e2e(
            sae_cfg, model, tok, texts, args.hookpoint, {**train, "objective": objective}, **rows
        ).sae
        timings[f"{name}_s"] = time.perf_counter() - t
        timings[f"{name}_s_per_step"] = timings[f"{name}_s"] / args.steps
        print(f"{name}: {timings[f'{name}_s']:.0f} s", flush=True)

    t = time.perf_counter()
    held = TokenRows(texts, tok, args.context)
    held.next_rows(n_rows - n_eval)
    batches = [b for b in (held.next_rows(args.rows) for _ in range(args.eval_batches)) if b is not None]
    report = e2e_report(saes, model, args.hookpoint, batches, args.downstream, special_ids(tok))
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    table = to_markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    setting = (
        f"{args.model} {args.hookpoint}, TopK d_sae={args.d_sae} k={args.k}, {args.steps} steps of {args.rows}x"
        f"{args.context} tokens, lr {args.lr}, torch threads {torch.get_num_threads()}"
    )
    text = f"{setting}\n\n{table}\nwall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    text += "\ne2e step parts (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in step.items()) + "\n"
    print(text)
    write_text(out / "report.md", text)
    result = {"setting": vars(args), "rows": [r.to_dict() for r in report], "timings": timings, "step": step}
    result["held_out_rows"] = {"first": n_rows - n_eval, "count": len(batches) * args.rows, "of": n_rows}
    write_json(out / "results.json", result)
    return result


if __name__ == "__main__":
    main()
