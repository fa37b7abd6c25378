import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.evals.downstream import downstream_fidelity
from saelab.models import ModelSource
from saelab.models.text import TokenRows, load_texts, special_ids
from tests.models import tiny


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = tiny.make_tokenizer()
    model = tiny.trained_gpt2()
    src = ModelSource(
        model,
        tok,
        tiny.make_texts(60),
        "transformer.h.0",
        context_size=16,
        batch_size=64,
        buffer_tokens=512,
        repeat=True,
    )
    sae = saelab.train(
        {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8},
        src,
        {"steps": 120, "progress": False, "lr": 3e-3, "lr_warmup_steps": 10},
    ).sae
    rows = TokenRows(load_texts(tiny.make_texts(12, seed=9)), tok, context_size=16)
    return model, tok, sae, [rows.next_rows(6) for _ in range(2)]


def test_error_term_restores_clean_output_exactly(setup):
    model, tok, sae, batches = setup
    m = downstream_fidelity(sae, model, "transformer.h.0", batches, special_ids(tok))
    assert m.max_abs_logit_diff_with_error == 0.0
    assert m.ce_sae_with_error == m.ce_clean and m.kl_sae_with_error == 0.0
    # the trained model needs layer 0; a trained SAE keeps most of what it does
    assert m.ce_zero_ablation > m.ce_clean + 0.5 and m.ce_mean_ablation > m.ce_clean + 0.5
    assert m.ce_recovered_vs_zero > 0.5 and m.ce_recovered_vs_mean > 0.5
    assert 0 < m.kl_sae < 0.5 * min(m.kl_zero_ablation, m.kl_mean_ablation)
    assert m.spliced_positions > 0 and m.scored_positions > m.spliced_positions / 2


def test_splicing_an_untrained_sae_hurts(setup):
    model, tok, sae, batches = setup
    fresh = saelab.create({"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8})
    m = downstream_fidelity(fresh, model, "transformer.h.0", batches, special_ids(tok))
    trained = downstream_fidelity(sae, model, "transformer.h.0", batches, special_ids(tok))
    assert m.kl_sae > 5 * trained.kl_sae and m.ce_sae > trained.ce_sae
    assert m.max_abs_logit_diff_with_error == 0.0


def test_width_mismatch_is_named(setup):
    model, tok, _, batches = setup
    wrong = saelab.create({"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4})
    with pytest.raises(ConfigError, match=r"transformer\.h\.0 .*width 64 but the SAE has d_in=32"):
        downstream_fidelity(wrong, model, "transformer.h.0", batches)


def test_a_token_aware_sae_gets_the_token_ids_of_the_spliced_positions(setup):
    """A Tokenized SAE whose only output is its per-token table: splicing it must read each
    position's own row (if the ids were dropped, every position would get the fallback row)."""
    from saelab.models import hooks
    from saelab.models.text import keep_mask

    model, tok, _, batches = setup
    vocab = len(tok)
    sums, counts = torch.zeros(vocab + 1, 64), torch.zeros(vocab + 1)
    hp = hooks.resolve(model, "transformer.h.0")[0]
    for ids, mask in batches:
        keep = keep_mask(ids, mask, special_ids(tok))
        acts = hooks.run(model, ids, [hp], mask)[hp.name][keep]
        sums.index_add_(0, ids[keep], acts)
        counts.index_add_(0, ids[keep], torch.ones(len(acts)))
    sae = saelab.create({"architecture": "tokenized", "d_in": 64, "d_sae": 128, "k": 1, "vocab_size": vocab})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.W_lookup.copy_(sums / counts.clamp_min(1)[:, None])
        sae.W_lookup[vocab] = sums[:vocab].sum(0) / counts[:vocab].sum()  # fallback: the overall mean
    m = downstream_fidelity(sae.eval(), model, "transformer.h.0", batches, special_ids(tok))
    # per-token means beat the overall mean (= mean ablation), which is all the fallback row knows
    assert m.ce_sae < m.ce_mean_ablation - 0.1
    assert m.max_abs_logit_diff_with_error == 0.0
