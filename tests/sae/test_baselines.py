"""Baselines behind the SAE interface: fitted by scikit-learn, matching pursuit trained by gradient."""

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.toys import ToySource, World

WORLD = {"n_features": 16, "d": 12, "firing_prob": 0.15, "magnitude_std": 0.2}


def sample(n=2000):
    return next(ToySource(World(WORLD), batch_size=n, seed=1)).x


@pytest.mark.parametrize("arch", ["pca", "ica"])
def test_linear_baselines_reconstruct_exactly_with_full_rank_and_pad_extra_latents(arch):
    sae = saelab.create({"architecture": arch, "d_in": 12, "d_sae": 20})
    x = sample()
    sae.fit(Batch(x=x))
    f = sae.encode(x)
    assert (f[:, 12:] == 0).all()  # at most d_in components; the rest are dead
    assert float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 1e-3


def test_pca_matches_sklearn_components():
    from sklearn.decomposition import PCA

    x = sample()
    sae = saelab.create({"architecture": "pca", "d_in": 12, "d_sae": 4})
    sae.fit(Batch(x=x))
    ref = PCA(4).fit(x.double().numpy())
    cos = (sae.W_dec.double() @ torch.as_tensor(ref.components_).t()).abs().diagonal()
    assert (cos > 0.999).all()


def test_nmf_codes_are_non_negative_and_reconstruct():
    x = sample()
    sae = saelab.create({"architecture": "nmf", "d_in": 12, "d_sae": 32})
    sae.fit(Batch(x=x))
    f = sae.encode(x)
    assert (f >= 0).all()
    assert float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.2


def test_dictionary_learning_codes_have_at_most_k_non_zeros():
    x = sample(1000)
    sae = saelab.create({"architecture": "dictionary_learning", "d_in": 12, "d_sae": 24, "k": 3, "epochs": 2})
    sae.fit(Batch(x=x))
    assert ((sae.encode(x) != 0).sum(-1) <= 3).all()


def test_matching_pursuit_explains_away_and_recovers_an_exact_sparse_code():
    sae = saelab.create(
        {"architecture": "matching_pursuit", "d_in": 12, "d_sae": 12, "k": 3, "apply_b_dec_to_input": False}
    )
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(12))
    f_true = torch.zeros(5, 12)
    f_true[:, [1, 4, 7]] = torch.rand(5, 3) + 0.5
    torch.testing.assert_close(sae.encode(f_true), f_true)
    assert not any(n == "W_enc" for n, _ in sae.named_parameters()) and sae.W_enc.shape == (12, 12)


def test_fitted_baselines_fit_beside_the_loop_through_saelab_train():
    src = ToySource(World(WORLD), batch_size=128, seed=0)
    r = saelab.train(
        {"architecture": "pca", "d_in": 12, "d_sae": 12},
        src,
        {"steps": 20, "progress": False, "log_every": 10, "norm_estimation_batches": 4},
    )
    assert r.steps == 0 and r.tokens == 4 * 128 and r.history[-1]["fvu"] < 1e-3
    x = next(ToySource(World(WORLD), batch_size=512, seed=3)).x  # ready: raw activations in
    assert float((r.sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 1e-3
