"""Run SAEBench's core eval on a saelab SAE; executed by test_saebench.py inside an environment
that has sae-bench installed (its dependencies pin numpy<2, so it cannot share saelab's venv).

A tiny random HookedTransformer stands in for the model and an in-memory token dataset for the
corpus, so nothing is downloaded. Prints one JSON line with the metrics and saelab's own numbers.
"""

import json
import sys

import torch

import saelab
from saelab.io.saebench import for_saebench


def main(arch: str) -> None:
    from datasets import Dataset
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens.training.activations_store import ActivationsStore
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    d_model, ctx, vocab = 16, 16, 50
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=d_model, n_ctx=ctx, d_head=8, n_heads=2, d_vocab=vocab, act_fn="gelu", d_mlp=32
        )
    ).eval()
    cfg = {"architecture": arch, "d_in": d_model, "d_sae": 48}
    if saelab.sae.get_class(arch).sweep_parameter == "k":
        cfg["k"] = 4
    sae = saelab.create(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    view = for_saebench(sae, model_name="tiny-random", hook_layer=1, context_size=ctx)
    _, view, _ = load_and_format_sae("custom", view, "cpu")
    tokens = torch.randint(1, vocab, (64, ctx))
    store = ActivationsStore(
        model=model,
        dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
        streaming=False,
        hook_name=view.cfg.hook_name,
        hook_head_index=None,
        context_size=ctx,
        d_in=d_model,
        n_batches_in_buffer=2,
        total_training_tokens=10_000,
        store_batch_size_prompts=8,
        train_batch_size_tokens=64,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    config = CoreEvalConfig(
        batch_size_prompts=8,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    metrics, features = run_evals(view, store, model, config)
    # saelab's own L0 on the same hookpoint, for the test to compare with SAEBench's
    _, cache = model.run_with_cache(tokens[:16], names_filter=[view.cfg.hook_name])
    acts = cache[view.cfg.hook_name].reshape(-1, d_model)
    with torch.no_grad():
        l0 = float((sae.encode(acts) != 0).float().sum(-1).mean())
    print(json.dumps({"metrics": metrics, "n_feature_metrics": len(features), "saelab_l0": l0}))


if __name__ == "__main__":
    main(sys.argv[1])
