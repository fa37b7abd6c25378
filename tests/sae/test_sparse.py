"""The sparse kernels equal the dense computation: values and every gradient, on random inputs,
with ties, k = 1, k = d_sae and rows that select nothing."""

from __future__ import annotations

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.sae import base
from saelab.sae.base import StepContext, encoder_matmul
from saelab.sae.sparse import (
    Selection,
    dense_preacts,
    kernel_mode,
    select_batch_topk,
    select_mask,
    select_topk,
    selected_preacts,
    sparse_decode,
)

D_IN, D_SAE, B = 12, 40, 30


def encoder_params(seed: int, with_b_dec: bool = True, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D_IN, D_SAE, generator=gen)
    if ties:  # duplicated columns and a constant input row give exactly equal pre-activations
        W_enc[:, D_SAE // 2 :] = W_enc[:, : D_SAE - D_SAE // 2]
    b_enc = torch.randn(D_SAE, generator=gen)
    if ties:
        b_enc[D_SAE // 2 :] = b_enc[: D_SAE - D_SAE // 2]
    b_dec = torch.randn(D_IN, generator=gen) if with_b_dec else None
    x = torch.randn(B, D_IN, generator=gen)
    if ties:
        x[::3] = 0.0
    params = [t.requires_grad_() for t in (x, W_enc, b_enc) + ((b_dec,) if with_b_dec else ())]
    return params, (x, W_enc, b_enc, b_dec)


def grads_of(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def assert_close(a, b, msg=""):
    """Equal up to fp32 rounding of sums: errors relative to the largest entry of the tensor."""
    for u, v in zip(a, b):
        scale = float(v.abs().max()) if v.numel() else 1.0
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=msg or None)


SELECTIONS = {
    "topk": lambda pre: select_topk(pre, 5),
    "k=1": lambda pre: select_topk(pre, 1),
    "k=d_sae": lambda pre: select_topk(pre, D_SAE),
    "batch_topk": lambda pre: select_batch_topk(pre, 5 * B),
    "mask": lambda pre: select_mask(pre > 1.0),
    "empty rows": lambda pre: select_mask((pre > 0.5) & (torch.arange(B)[:, None] % 4 == 0)),
    "nothing": lambda pre: select_mask(pre > 1e9),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
@pytest.mark.parametrize("with_b_dec", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_selected_preacts_and_sparse_decode_match_dense_autograd(name, with_b_dec, ties):
    params, (x, W_enc, b_enc, b_dec) = encoder_params(
        list(SELECTIONS).index(name) * 4 + 2 * with_b_dec + ties, with_b_dec, ties
    )
    W_dec = torch.randn(D_SAE, D_IN, requires_grad=True)
    target = torch.randn(B, D_IN)
    pre_graph = encoder_matmul(x, W_enc, b_dec, b_enc)
    sel = SELECTIONS[name](pre_graph.detach())

    # dense reference: autograd through the full matmul, the selection applied as a mask
    f_dense = sel.to_dense(torch.relu(sel.gather(pre_graph)))
    ref_loss = ((f_dense @ W_dec - target) ** 2).sum() + f_dense.sum()
    ref = grads_of(ref_loss, params + [W_dec])

    values = torch.relu(selected_preacts(sel, pre_graph.detach(), x, W_enc, b_enc, b_dec))
    assert torch.equal(sel.to_dense(values.detach()), f_dense.detach())
    loss = ((sparse_decode(sel, values.reshape(-1) if sel.offsets is not None else values, W_dec) - target) ** 2).sum()
    loss = loss + values.sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert_close(grads_of(loss, params + [W_dec]), ref)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_dense_preacts_has_the_gradients_of_the_encoder_matmul(with_b_dec):
    params, (x, W_enc, b_enc, b_dec) = encoder_params(seed=3, with_b_dec=with_b_dec)
    weight = torch.randn(B, D_SAE)
    pre = encoder_matmul(x, W_enc, b_dec, b_enc)
    ref = grads_of((torch.relu(pre) * weight).sum(), params)
    attached = dense_preacts(pre.detach(), x, W_enc, b_enc, b_dec)
    assert torch.equal(attached.detach(), pre.detach())
    assert_close(grads_of((torch.relu(attached) * weight).sum(), params), ref)


def test_batch_topk_selection_is_the_exact_global_top():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        scores = torch.randn(512, 1024, generator=gen) * (1 + trial)  # large enough for the sampled threshold
        n_keep = 512 * (4 + 8 * trial)
        sel = select_batch_topk(scores, n_keep)
        got = scores[sel.rows(), sel.cols]
        assert got.numel() == n_keep
        assert torch.equal(got.sort().values, scores.reshape(-1).topk(n_keep).values.sort().values)
        assert torch.all(sel.rows()[1:] >= sel.rows()[:-1])  # row order, as embedding_bag needs


def test_selection_rows_and_dense_round_trip():
    mask = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    sel = select_mask(mask)
    assert sel.offsets.tolist() == [0, 2, 2]
    assert sel.rows().tolist() == [0, 0, 2, 2]
    assert torch.equal(sel.to_dense(torch.ones(4)) != 0, mask)
    assert isinstance(sel, Selection)


ARCHITECTURES = {
    "topk": {"k": 4, "k_aux": 6},
    "batchtopk": {"k": 4, "k_aux": 6},
    "relu": {},
    "jumprelu": {"init_threshold": 0.5, "bandwidth": 0.4},
    "gated": {},
    "matryoshka": {"k": 4, "k_aux": 6},
    "tokenized": {"k": 4, "k_aux": 6, "vocab_size": 7},
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("any_dead", [False, True])
def test_training_step_sparse_equals_dense(arch, any_dead):
    """Every loss term and every parameter gradient, sparse kernels against the dense path."""
    sae = saelab.create({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, **ARCHITECTURES[arch]})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, D_IN, generator=gen) * 2
    dead = torch.rand(D_SAE, generator=gen) < 0.4 if any_dead else torch.zeros(D_SAE, dtype=torch.bool)
    results = {}
    for mode in ("sparse", "dense"):
        sae.zero_grad()
        with kernel_mode(mode):
            batch = Batch(x=x, tokens=torch.arange(B) % 7)
            out = sae.loss_terms(x, StepContext(dead_mask=dead, sparsity_scale=1.0, batch=batch))
        out.loss.backward()
        results[mode] = (out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    (sparse, g_sparse), (dense, g_dense) = results["sparse"], results["dense"]
    assert type(sparse.feature_acts).__name__ == "SparseActs"
    assert torch.equal(sparse.dense_feature_acts(), dense.dense_feature_acts())
    assert torch.equal(sparse.fired_counts(), dense.fired_counts())
    assert sparse.mean_l0() == dense.mean_l0() > 0
    assert sparse.losses.keys() == dense.losses.keys()
    for name in sparse.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=1e-5, atol=1e-5)
    assert any_dead is False or float(sparse.losses.get("auxk", torch.ones(())).detach()) > 0
    assert g_sparse.keys() == g_dense.keys()
    for name in g_sparse:
        assert_close([g_sparse[name]], [g_dense[name]], msg=f"{arch} grad {name}")


def test_auto_mode_takes_the_dense_path_for_dense_activations():
    sae = saelab.create({"architecture": "relu", "d_in": D_IN, "d_sae": D_SAE, "l1_coefficient": 0.0})
    x = torch.randn(B, D_IN)
    out = sae.loss_terms(x, StepContext())  # about half the latents fire at initialisation
    assert isinstance(out.feature_acts, torch.Tensor)
    with kernel_mode("sparse"):
        assert not isinstance(sae.loss_terms(x, StepContext()).feature_acts, torch.Tensor)
    with pytest.raises(ValueError, match="kernel mode"):
        with kernel_mode("fast"):
            pass


def test_training_buffer_is_reused_between_steps_and_released_after_training():
    sae = saelab.create({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 3})
    x = torch.randn(B, D_IN)
    first = sae.training_pre_acts(x)
    assert sae.training_pre_acts(x * 2).data_ptr() == first.data_ptr()
    torch.testing.assert_close(sae.training_pre_acts(x), sae.pre_acts(x).detach())
    assert sae.training_pre_acts(x[:5]).shape == (5, D_SAE)  # another batch size: a new buffer
    other = saelab.create({"architecture": "relu", "d_in": D_IN, "d_sae": D_SAE})
    assert other.training_pre_acts(x).data_ptr() == first.data_ptr()  # one buffer per shape, shared
    saelab.train(sae, [x] * 20, {"steps": 3, "progress": False, "norm_estimation_batches": 1})
    assert not any(key[1] == D_SAE for key in base._PRE_BUFFERS)  # released after training
