"""Metrics on SAEs whose answers are known by construction."""

import pytest
import torch

import saelab
from saelab.evals import ground_truth_recovery, latent_density, reconstruction_metrics
from saelab.evals.summary import evaluate


def dictionary_sae(directions: torch.Tensor, d_sae: int | None = None, scale: float = 1.0):
    """A ReLU SAE whose decoder rows are `directions` and encoder their transpose: exact on
    non-negative codes over orthonormal directions."""
    n, d = directions.shape
    sae = saelab.create({"architecture": "relu", "d_in": d, "d_sae": d_sae or n})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_enc.zero_()
        sae.W_dec[:n] = directions * scale
        sae.W_enc[:, :n] = directions.t()
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    return sae.eval()


def orthonormal(n, d, seed=0):
    return torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))[0].t()


def batches(directions, n_batches=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        codes = (torch.rand(256, directions.shape[0], generator=gen) < 0.2).float() * torch.rand(
            256, directions.shape[0], generator=gen
        )
        out.append(codes @ directions)
    return out


def test_perfect_dictionary_reconstructs_and_recovers_everything():
    dirs = orthonormal(8, 16)
    sae = dictionary_sae(dirs, d_sae=12)
    rec = reconstruction_metrics(sae, batches(dirs))
    assert rec.fvu < 1e-10 and rec.explained_variance == pytest.approx(1.0)
    assert rec.shrinkage == pytest.approx(1.0, abs=1e-5) and rec.cosine_similarity == pytest.approx(1.0, abs=1e-5)
    gt = ground_truth_recovery(sae, dirs)
    assert gt.recovered_fraction == 1.0 and gt.mmcs_decoder == pytest.approx(1.0, abs=1e-6)
    assert gt.mmcs_encoder == pytest.approx(1.0, abs=1e-6)


def test_shrinkage_measures_the_relative_reconstruction_bias():
    dirs = orthonormal(8, 16)
    sae = dictionary_sae(dirs, scale=0.8)  # every reconstruction is 0.8 x: gamma* = 0.8
    rec = reconstruction_metrics(sae, batches(dirs))
    assert rec.shrinkage == pytest.approx(0.8, abs=1e-5)
    assert rec.norm_ratio == pytest.approx(0.8, abs=1e-5)


def test_l0_and_density_count_active_latents():
    dirs = orthonormal(8, 16)
    sae = dictionary_sae(dirs, d_sae=10)  # latents 8 and 9 never fire
    with torch.no_grad():
        sae.b_enc.fill_(-1e-5)  # silence float round-off on inactive features
    data = batches(dirs, n_batches=8)
    x = torch.cat(data)
    true_l0 = ((x @ dirs.t()) > 1e-5).sum(1).float().mean().item()
    assert reconstruction_metrics(sae, data).l0 == pytest.approx(true_l0, rel=1e-6)
    dens = latent_density(sae, data, dense_threshold=0.15)
    assert dens.dead_fraction == pytest.approx(0.2)
    assert dens.dense_fraction == pytest.approx(0.8)  # each feature fires ~20% of the time
    assert sum(dens.histogram_counts) == 8
    record = evaluate(sae, data, dense_threshold=0.15).as_dict()  # one encoding pass for both
    assert (record["dead_fraction"], record["dense_fraction"]) == (dens.dead_fraction, dens.dense_fraction)
    assert record["density_histogram"]["counts"] == dens.histogram_counts


def test_recovery_is_one_to_one_so_duplicates_do_not_count_twice():
    dirs = orthonormal(4, 16)
    dup = torch.stack([dirs[0], dirs[0], dirs[1], dirs[2]])  # feature 3 missing, feature 0 twice
    sae = dictionary_sae(dup)
    gt = ground_truth_recovery(sae, dirs)
    assert gt.recovered_fraction == pytest.approx(0.75)
    assert gt.mmcs_decoder == pytest.approx(0.75 + 0.25 * gt.matched_cosines[3], abs=1e-5)


def test_recovery_threshold_is_respected():
    dirs = orthonormal(4, 16)
    noisy = torch.nn.functional.normalize(dirs + 0.5 * orthonormal(4, 16, seed=1), dim=1)
    sae = dictionary_sae(noisy)
    cos = (noisy * dirs).sum(1)
    gt = ground_truth_recovery(sae, dirs, threshold=0.85)
    assert gt.recovered_fraction == pytest.approx((cos >= 0.85).float().mean().item())
