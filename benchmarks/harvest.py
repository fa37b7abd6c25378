"""Harvesting throughput: saelab's hooks + shuffling buffer (and the disk cache) against a bare
forward pass of the same model cut at the same layer, plus the cache's read speed against the
trainer's consumption.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harvest.py                 # SmolLM2-135M, layer 15
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/harvest.py --tiny   # a tiny GPT-2, seconds

Tokens/s count every position the model processes (including BOS, which the source then drops),
so the two sides do the same work. Each measurement is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch
from _timing import race


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hookpoint", default="model.layers.15")
    ap.add_argument("--rows", type=int, default=64, help="Rows of --context-size tokens per measurement.")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--model-batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="A random 4-layer GPT-2 (d 256) instead of a real model.")
    ap.add_argument("--out", help="Write the numbers as JSON here.")
    args = ap.parse_args()

    from saelab.activations.cache import CachedSource, write_cache
    from saelab.models import Harvester, ModelSource, hooks
    from saelab.models.source import load_model
    from saelab.models.text import TokenRows, load_texts, pydoc_texts

    if args.tiny:
        from transformers import GPT2Config, GPT2LMHeadModel

        from tests.models.tiny import make_texts, make_tokenizer

        tokenizer = make_tokenizer()
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tokenizer), n_positions=args.context_size)
        ).eval()
        args.hookpoint = "transformer.h.2"
        texts = make_texts(4000)
        name = "tiny-gpt2"
    else:
        model, tokenizer = load_model(args.model)
        texts = pydoc_texts()
        name = args.model
    hp = hooks.resolve(model, args.hookpoint)[0]
    rows = TokenRows(load_texts(texts), tokenizer, args.context_size)
    batches = [rows.next_rows(args.model_batch_size) for _ in range(args.rows // args.model_batch_size)]
    n_tok = sum(b[0].numel() for b in batches)

    # bare forward: a copy of the model with the layers after the hooked one removed
    layer_list_path = hp.module.rsplit(".", 1)[0]
    layer_idx = int(hp.module.rsplit(".", 1)[1])
    parent = model.get_submodule(layer_list_path.rsplit(".", 1)[0]) if "." in layer_list_path else model
    base = copy.copy(parent)  # shallow: shares weights; its own module table so the original is untouched
    base._modules = dict(base._modules)
    setattr(
        base,
        layer_list_path.rsplit(".", 1)[-1],
        torch.nn.ModuleList(list(model.get_submodule(layer_list_path))[: layer_idx + 1]),
    )
    if hasattr(base, "config"):
        base.config = copy.copy(base.config)
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(base.config, key):
                setattr(base.config, key, layer_idx + 1)

    @torch.no_grad()
    def bare():
        for ids, mask in batches:
            base(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.no_grad()
    def full():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def hooked():
        for ids, mask in batches:
            hooks.run(model, ids, [hp], mask)

    bare()  # warm-up

    # the buffer path: fill two buffers and hand out every batch; tokens counted as the rows the model ran on
    processed = {"tokens": 0}
    original = Harvester.harvest_rows

    def counting(self, ids, mask):
        processed["tokens"] += ids.numel()
        return original(self, ids, mask)

    Harvester.harvest_rows = counting

    def buffered():
        src = ModelSource(
            model,
            tokenizer,
            texts,
            hp.name,
            context_size=args.context_size,
            batch_size=256,
            buffer_tokens=n_tok // 2,
            model_batch_size=args.model_batch_size,
            model_name=name,
        )
        while True:
            next(src)
            if src.block == 1 and (src.emitted + 1) * 256 > src._buffer["tokens"].numel():
                return

    harvester = Harvester(
        model,
        tokenizer,
        texts,
        [hp.name],
        context_size=args.context_size,
        model_batch_size=args.model_batch_size,
        model_name=name,
    )

    with tempfile.TemporaryDirectory() as tmp:

        def cache():
            import shutil

            shutil.rmtree(f"{tmp}/c", ignore_errors=True)
            harvester.rows.load_state_dict(TokenRows(load_texts(["x"]), tokenizer, args.context_size).state_dict())
            write_cache(harvester, f"{tmp}/c", max_tokens=int(n_tok * 0.95), shard_tokens=n_tok // 4)

        def counted(fn):
            def run():
                start = processed["tokens"]
                fn()
                counts[fn.__name__] = processed["tokens"] - start

            run.__name__ = fn.__name__
            return run

        counts: dict[str, int] = {}
        t = race(
            {"bare": bare, "full": full, "hooked": hooked, "buffered": counted(buffered), "cache": counted(cache)},
            args.repeats,
        )
        t_bare, t_full, t_hook, t_buf, t_cache = t["bare"], t["full"], t["hooked"], t["buffered"], t["cache"]
        buf_tokens, cache_tokens = counts["buffered"], counts["cache"]
        reader = CachedSource(f"{tmp}/c", hp.name, batch_size=1024, repeat=True)
        t0 = time.perf_counter()
        n_read = 0
        while time.perf_counter() - t0 < 2.0:
            n_read += next(reader).x.shape[0]
        read_tps = n_read / (time.perf_counter() - t0)

    import saelab

    d = harvester.widths[hp]
    sae = saelab.create({"architecture": "topk", "d_in": d, "d_sae": 8 * d, "k": 32})
    x = torch.randn(4096, d)
    res = saelab.train(
        sae,
        [x[i : i + 1024] for i in range(0, 4096, 1024)] * 10,
        {"steps": 30, "progress": False, "norm_estimation_batches": 1},
    )
    train_tps = res.tokens / res.seconds

    out = {
        "model": name,
        "hookpoint": hp.name,
        "tokens_per_measurement": n_tok,
        "threads": torch.get_num_threads(),
        "full_forward_tok_s": n_tok / t_full,
        "bare_forward_to_layer_tok_s": n_tok / t_bare,
        "hooks_early_stop_tok_s": n_tok / t_hook,
        "hooks_plus_buffer_tok_s": buf_tokens / t_buf,
        "hooks_plus_cache_write_tok_s": cache_tokens / t_cache,
        "overhead_hooks_vs_bare": t_hook / t_bare - 1,
        "overhead_buffer_vs_bare": (t_buf / buf_tokens) / (t_bare / n_tok) - 1,
        "overhead_cache_vs_bare": (t_cache / cache_tokens) / (t_bare / n_tok) - 1,
        "cache_read_tok_s": read_tps,
        "trainer_consumes_tok_s (topk 8x, k=32)": train_tps,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        from saelab.io.atomic import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()
