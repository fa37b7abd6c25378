"""Archetypal SAEs: atoms are convex combinations of k-means candidates, relaxation is bounded."""

import torch

import saelab
from saelab.activations.base import Batch
from saelab.sae import StepContext


def fitted(arch="archetypal", **extra):
    sae = saelab.create({"architecture": arch, "d_in": 8, "d_sae": 16, "k": 3, "n_candidates": 24, **extra})
    x = torch.randn(400, 8).abs()
    sae.init_from_data(Batch(x=x))
    return sae, x


def test_candidates_are_kmeans_centroids_and_atoms_start_on_them():
    sae, x = fitted()
    # every candidate is the mean of the points closest to it (a Lloyd fixed point)
    assign = torch.cdist(x - sae.b_dec, sae.candidates).argmin(1)
    for c in assign.unique()[:5]:
        torch.testing.assert_close(sae.candidates[c], (x - sae.b_dec)[assign == c].mean(0), atol=1e-4, rtol=1e-4)
    assert torch.equal((sae.A > 0).sum(1), torch.ones(16, dtype=torch.long))


def test_after_a_step_A_is_row_stochastic_and_the_relaxation_is_bounded():
    for arch, delta in [("archetypal", 0.0), ("relaxed_archetypal", 0.3)]:
        sae, x = fitted(arch, relaxation=delta)
        out = sae.loss_terms(x[:64], StepContext())
        out.loss.backward()
        torch.optim.SGD(sae.parameters(), lr=1.0).step()
        sae.after_optimizer_step(out)
        assert (sae.A >= 0).all()
        torch.testing.assert_close(sae.A.sum(1), torch.ones(16))
        assert (sae.Lambda.norm(dim=1) <= delta + 1e-6).all()
        hull = sae.A @ sae.candidates  # inside the hull of the candidates (plus at most delta)
        assert ((sae.W_dec / sae.log_scale.exp() - hull).norm(dim=1) <= delta + 1e-5).all()
