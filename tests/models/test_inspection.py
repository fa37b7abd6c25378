import pytest
import torch

import saelab
from saelab.models.inspection import final_norm, html_report, inspect_latents, logit_lens, text_report
from saelab.models.text import TokenRows, load_texts, special_ids


def test_top_contexts_density_and_logit_lens(gpt2, tokenizer, texts):
    sae = saelab.create({"architecture": "relu", "d_in": 64, "d_sae": 48})
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)  # a little sparser than half
    rows = TokenRows(load_texts(texts[:16]), tokenizer, context_size=16)
    batches = []
    while (b := rows.next_rows(4)) is not None:
        batches.append(b)
    res = inspect_latents(
        sae, gpt2, tokenizer, "transformer.h.0", batches, n_latents=5, top_k=3, specials=special_ids(tokenizer)
    )
    assert len(res["latents"]) == 5 and res["tokens_scanned"] > 0
    dens = [e["density"] for e in res["latents"]]
    assert dens == sorted(dens, reverse=True) and 0 < dens[0] <= 1
    all_ids, _all_mask = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for e in res["latents"]:
        acts = [c["activation"] for c in e["top_contexts"]]
        assert acts == sorted(acts, reverse=True)
        c = e["top_contexts"][0]
        # the reported per-token activation at the peak equals the SAE on that token's activation
        from saelab.models import hooks

        h = hooks.run(gpt2, all_ids[c["row"] : c["row"] + 1], hooks.resolve(gpt2, "transformer.h.0"))["transformer.h.0"]
        f = sae.encode(h[0, c["position"]])[e["latent"]].detach()
        assert abs(float(f) - c["activation"]) < 1e-4 and c["activations"][c["max_index"]] == round(c["activation"], 4)
        assert c["tokens"][c["max_index"]] == tokenizer.decode([int(all_ids[c["row"], c["position"]])])
        promoted = e["logit_lens"]["promoted"][0][0]
        d = sae.W_dec[e["latent"]].detach()
        top = int((gpt2.lm_head.weight @ (gpt2.transformer.ln_f.weight * (d - d.mean()))).detach().argmax())
        assert promoted == tokenizer.decode([top])
    assert "latent" in text_report(res) and "<span" in html_report(res)


def _ranked(logits: torch.Tensor, k: int) -> list[list[int]]:
    return logits.topk(k).indices.tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logit_lens_goes_through_the_final_norm_gain(kind):
    """A final norm with a far-from-uniform gain (some dimensions x5, some negated): the lens
    must rank tokens by W_U (g * d) (RMSNorm) or W_U (g * (d - mean d)) (LayerNorm), and that
    ranking differs from the naive W_U d."""
    from tests.models import tiny

    model = tiny.make_llama() if kind == "llama" else tiny.make_gpt2()
    path, norm = ("model.norm", model.model.norm) if kind == "llama" else ("transformer.ln_f", model.transformer.ln_f)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen) * torch.where(torch.arange(64) < 8, 5.0, 0.5))
        if kind == "gpt2":
            norm.bias.copy_(torch.randn(64, generator=gen))  # a bias shifts every logit alike: no effect on d's
    assert final_norm(model)[0] == path
    d = torch.randn(12, 64, generator=gen)
    lens = logit_lens(model, d, k=5)
    W = model.get_output_embeddings().weight.detach()
    g = norm.weight.detach()
    through = d * g if kind == "llama" else (d - d.mean(1, keepdim=True)) * g
    want = W @ (through / through.norm(dim=1, keepdim=True)).t()
    assert lens.final_norm == path
    assert lens.top_ids == _ranked(want.t(), 5) and lens.bottom_ids == _ranked(-want.t(), 5)
    assert torch.allclose(torch.tensor(lens.top_values), want.t().topk(5).values, atol=1e-5)
    assert lens.top_ids != _ranked((W @ d.t()).t(), 5)  # the gain matters here


def test_logit_lens_without_a_final_norm():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.emb(input_ids))

    model = Bare()
    d = torch.randn(3, 4)
    lens = logit_lens(model, d, k=2)
    assert lens.final_norm is None and lens.top_ids == _ranked(d @ model.head.weight.detach().t(), 2)
