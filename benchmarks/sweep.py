"""A sweep of N SAEs on one activation stream against N separate runs of the same SAEs.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/sweep.py              # toy world and a tiny GPT-2
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/sweep.py --steps 50 --repeats 1

Two sources: (a) a toy world, where a batch is cheap to sample, and (b) a randomly initialised
4-layer GPT-2 (d 256, built from a config, no download) read at `transformer.h.2` through
`ModelSource`, where each batch costs a model forward. The separate runs each build their own
source (the model object itself is shared, so loading it is not counted); the sweep builds one.
Each side is timed best-of --repeats, run alternately so load from other processes hits both
alike. Reported: seconds of each, and ratio = sweep / sum of separate runs (below 1: the sweep
saves that fraction). PYTHONPATH needs `.` for the tiny tokenizer in tests/models/tiny.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from _timing import race


def compare(name: str, saes: list[dict], make_source, train: dict, repeats: int) -> dict:
    import saelab

    def separate():
        for cfg in saes:
            saelab.train(cfg, make_source(), train)

    def sweep():
        saelab.train_many(saes, make_source(), train)

    t = race({"separate": separate, "sweep": sweep}, repeats)
    row = {
        "source": name,
        "n_saes": len(saes),
        "steps": train["steps"],
        "separate_s": round(t["separate"], 3),
        "sweep_s": round(t["sweep"], 3),
        "ratio": round(t["sweep"] / t["separate"], 3),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="Write the rows as JSON here.")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from saelab.models import ModelSource
    from saelab.toys import ToySource, World
    from tests.models.tiny import make_texts, make_tokenizer

    train = {
        "steps": args.steps,
        "progress": False,
        "lr_warmup_steps": 10,
        "sparsity_warmup_steps": 20,
        "norm_estimation_batches": 2,
        "log_every": 50,
    }
    rows = []

    # (a) toy world: 256 true features in 64 dimensions; four TopK widths of k plus a ReLU
    world = World({"n_features": 256, "d": 64, "firing_prob": 0.02})
    toy_saes = [{"architecture": "topk", "d_in": 64, "d_sae": 512, "k": k} for k in (3, 5, 8)]
    toy_saes.append({"architecture": "relu", "d_in": 64, "d_sae": 512})
    rows.append(compare("toy", toy_saes, lambda: ToySource(world, batch_size=1024), train, args.repeats))

    # (b) a tiny GPT-2's residual stream after block 2: every batch needs a forward of 3 blocks
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=4,
            n_embd=256,
            n_head=4,
            vocab_size=len(tokenizer),
            n_positions=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    texts = make_texts(2000)
    model_saes = [{"architecture": "topk", "d_in": 256, "d_sae": 1024, "k": k} for k in (8, 16, 32)]
    model_saes.append({"architecture": "relu", "d_in": 256, "d_sae": 1024})

    def model_source():
        return ModelSource(
            model,
            tokenizer,
            texts,
            "transformer.h.2",
            batch_size=512,
            buffer_tokens=4096,
            repeat=True,
            context_size=64,
            model_batch_size=16,
        )

    rows.append(compare("tiny_gpt2", model_saes, model_source, train, args.repeats))
    load = os.getloadavg()
    print(
        f"load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "loadavg": load}, f, indent=2)


if __name__ == "__main__":
    main()
