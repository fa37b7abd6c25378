import torch

import saelab
from saelab.models.inspection import html_report, inspect_latents, text_report
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
        top = int((gpt2.lm_head.weight @ sae.W_dec[e["latent"]]).detach().argmax())
        assert promoted == tokenizer.decode([top])
    assert "latent" in text_report(res) and "<span" in html_report(res)
