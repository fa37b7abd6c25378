"""What `saelab fidelity` costs against its floor: the model forwards it cannot avoid.

    .venv/bin/python benchmarks/fidelity_cost.py                 # SmolLM2-135M, layer 6, 32 rows of 128
    .venv/bin/python benchmarks/fidelity_cost.py --rows 8 --repeats 1   # a quick check

Per batch, the SAE splice needs one clean forward and one for each variant it scores (the SAE,
the SAE plus its error term, zero- and mean-ablation): five full forwards, plus one forward cut at
the hookpoint for the mean activation (the mean-ablation baseline). The floor is exactly those
forwards, timed bare (no hooks, no SAE, no metrics) on the same batches; the ratio says what the
hooks, the SAE and the metric bookkeeping add. The SAE is a fresh TopK one (its weights do not
change the cost). Each figure is the best of `--repeats` runs, on one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--hookpoint", default="model.layers.6")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="Write results.json here.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import saelab
    from saelab.evals.downstream import downstream_fidelity
    from saelab.models import hooks
    from saelab.models.source import load_model
    from saelab.models.text import eval_batches

    model, tokenizer = load_model(args.model)
    hp = hooks.resolve(model, args.hookpoint)[0]
    batches = list(eval_batches(tokenizer, {"data": "pydoc", "context_size": args.context_size}, args.rows))
    width = int(hooks.run(model, batches[0][0][:1, :4], [hp])[hp.name].shape[-1])
    sae = saelab.create({"architecture": "topk", "d_in": width, "d_sae": args.d_sae, "k": 32}).eval()

    @torch.no_grad()
    def floor() -> None:
        for ids, mask in batches:
            hooks.run(model, ids, [hp], mask)  # the mean-activation pass, cut at the hookpoint
            for _ in range(5):  # clean, SAE, SAE + error, zero- and mean-ablation
                model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def fidelity() -> None:
        downstream_fidelity(sae, model, args.hookpoint, batches)

    fidelity()  # warm caches (first-call allocations) for both
    t_floor = best_of(floor, args.repeats)
    t_fid = best_of(fidelity, args.repeats)
    tokens = sum(int(m.sum()) for _, m in batches)
    row = {
        "model": args.model,
        "hookpoint": args.hookpoint,
        "rows": sum(ids.shape[0] for ids, _ in batches),
        "tokens": tokens,
        "threads": args.threads,
        "floor_s": t_floor,
        "fidelity_s": t_fid,
        "ratio": t_fid / t_floor,
    }
    print(
        f"{args.model} {args.hookpoint}, {row['rows']} rows ({tokens} tokens), {args.threads} thread(s)\n"
        f"| what | seconds | / floor |\n|---|---|---|\n"
        f"| floor: 5 full forwards + 1 cut at the hookpoint per batch | {t_floor:.2f} | 1.00x |\n"
        f"| saelab fidelity (downstream_fidelity) | {t_fid:.2f} | {t_fid / t_floor:.2f}x |"
    )
    if args.out:
        from pathlib import Path

        from saelab.io.atomic import write_json

        write_json(Path(args.out) / "results.json", row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
