"""Transcoder and crosscoder recovery: a dictionary built from the truth scores ~1, a random one
scores at its chance level (computed here), and confusions show up where they were planted."""

import math

import pytest
import torch
from scipy import stats

from saelab.errors import ConfigError
from saelab.evals.circuits import (
    crosscoder_recovery,
    match_directions,
    relative_decoder_norms,
    relative_norm_category,
    transcoder_recovery,
)
from saelab.toys.circuits import CrosscoderWorld, TranscoderWorld


class Dictionary(torch.nn.Module):
    """Just the parameter contract the metrics read: W_enc [d_in, d_sae], W_dec [d_sae, d_out]."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor):
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc.clone())
        self.W_dec = torch.nn.Parameter(W_dec.clone())


def cos_tail(t: float, dim: int) -> float:
    """P(cos(u, v) >= t) for independent uniformly random directions in `dim` dimensions:
    (1 + cos) / 2 ~ Beta((dim - 1) / 2, (dim - 1) / 2)."""
    a = (dim - 1) / 2
    return float(stats.beta.sf((1 + t) / 2, a, a))


def random_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


TC = {"n_in": 48, "d_in": 24, "n_out": 40, "d_out": 20}
CC = {"d": 24, "n_shared": 24, "n_a_only": 12, "n_b_only": 12, "n_rescaled": 12}


# ---------------------------------------------------------------------------- transcoders
def test_a_transcoder_built_from_the_truth_recovers_every_feature():
    world = TranscoderWorld(TC)
    extra = 16  # spare latents must not change anything
    W_enc = torch.cat([world.input_directions, random_rows(extra, 24, 1)]).t()
    W_dec = torch.cat([world.output_directions, random_rows(extra, 20, 2)])
    perm = torch.randperm(48 + extra, generator=torch.Generator().manual_seed(0))  # latent order is irrelevant
    r = transcoder_recovery(Dictionary(W_enc[:, perm], W_dec[perm]), world)
    assert r.encoder_recovered == r.output_recovered == r.both_recovered == 1.0
    assert r.mmcs_encoder == pytest.approx(1.0, abs=1e-5) and r.mmcs_output == pytest.approx(1.0, abs=1e-5)
    inverse = torch.argsort(perm)
    assert r.matched_latents == inverse[:48].tolist()


def test_a_random_transcoder_scores_at_chance():
    world = TranscoderWorld(TC)
    d_sae = 96
    r = transcoder_recovery(Dictionary(random_rows(d_sae, 24, 3).t(), random_rows(d_sae, 20, 4)), world)
    # Chance: a feature is recovered only if one of the d_sae random latents lies within cos 0.9 of
    # it; by the union bound the expected number recovered is <= n_in * d_sae * P(cos >= 0.9),
    # about 1e-5 in 20 dimensions, so seeing even one recovered feature would be a bug.
    for dim in (24, 20):
        assert 48 * d_sae * cos_tail(0.9, dim) < 1e-3
    assert r.encoder_recovered == r.output_recovered == r.both_recovered == 0.0
    # The best of d_sae random cosines stays below t where d_sae * P(cos >= t) = 1e-3 for each feature
    # (so the mean of the maxima does too, with probability >= 1 - 48e-3).
    t = next(t / 100 for t in range(100) if d_sae * cos_tail(t / 100, 20) < 1e-3)
    assert r.mmcs_output < t and r.mmcs_encoder < t


def test_a_transcoder_that_reads_right_but_writes_wrong_counts_only_encoder_recovery():
    world = TranscoderWorld(TC)
    # decoder rows of feature i's latent point along the output direction of feature i+1
    shifted = world.output_directions.roll(1, 0)
    r = transcoder_recovery(Dictionary(world.input_directions.t(), shifted), world)
    assert r.encoder_recovered == 1.0 and r.output_recovered == 1.0  # each alone is matched somewhere
    assert r.both_recovered < 0.2  # but no latent reads feature i and writes v_i


def test_transcoder_recovery_refuses_the_wrong_widths():
    world = TranscoderWorld(TC)
    with pytest.raises(ConfigError, match="d_out=20"):
        transcoder_recovery(Dictionary(random_rows(8, 24, 0).t(), random_rows(8, 24, 0)), world)


# ---------------------------------------------------------------------------- crosscoders
def test_a_crosscoder_built_from_the_truth_recovers_and_classifies_every_feature():
    world = CrosscoderWorld(CC)
    n = world.n_features
    W_dec = torch.cat([world.directions, random_rows(8, 48, 5) * 0.3])
    r = crosscoder_recovery(Dictionary(W_dec.t(), W_dec), world)
    assert r.recovered == {c: 1.0 for c in ("shared", "a_only", "b_only", "rescaled")}
    assert r.category_accuracy == {c: 1.0 for c in ("shared", "a_only", "b_only", "rescaled")}
    assert r.confusion["a_only"]["a_only"] == 12 and r.confusion["b_only"]["b_only"] == 12
    assert r.confusion["shared"]["shared"] == 24 and r.confusion["rescaled"]["shared"] == 12  # x0.5, x2 -> r 1/3, 2/3
    assert all(v == pytest.approx(0.0, abs=1e-5) for v in r.relative_norm_error.values())
    assert r.site_recovered == {"a": 1.0, "b": 1.0}
    assert r.matched_latents == list(range(n))


def test_a_random_crosscoder_scores_at_chance():
    world = CrosscoderWorld(CC)
    d, d_sae = 24, 200
    W_dec = random_rows(d_sae, 2 * d, 6)
    r = crosscoder_recovery(Dictionary(W_dec.t(), W_dec), world)
    # Recovery: as for transcoders, the union bound over 60 features x 200 latents in 48 dims.
    assert 60 * d_sae * cos_tail(0.9, 2 * d) < 1e-3
    assert all(v == 0.0 for v in r.recovered.values())
    # Classification: a Gaussian row's halves have |d_b|^2 / |d_a|^2 ~ F(d, d), so
    # P(r < 0.1) = P(F < 1/81) (about 1e-7 here) and P(0.3 <= r <= 0.7) = P((3/7)^2 <= F <= (7/3)^2).
    p_single = stats.f.cdf(1 / 81, d, d)
    p_shared = stats.f.cdf((7 / 3) ** 2, d, d) - stats.f.cdf((3 / 7) ** 2, d, d)
    assert 24 * p_single < 1e-3
    assert r.category_accuracy["a_only"] == 0.0 and r.category_accuracy["b_only"] == 0.0
    # Shared features are matched to 24 of the random latents, each "shared" with prob p_shared
    # (~0.995); 24 draws fall below p_shared - 5 sigma less than once in 10^6 runs.
    sigma = math.sqrt(p_shared * (1 - p_shared) / 24)
    assert r.category_accuracy["shared"] >= p_shared - 5 * sigma - 1 / 24
    r_all = torch.tensor(r.latent_relative_norms)
    assert (
        abs(float((r_all.ge(0.3) & r_all.le(0.7)).float().mean()) - p_shared)
        < 5 * math.sqrt(p_shared * (1 - p_shared) / d_sae) + 1 / d_sae
    )


def test_single_site_features_written_to_both_sites_show_up_as_confused():
    world = CrosscoderWorld(CC)
    W_dec = world.directions.clone()
    a_only = world.category_indices("a_only")
    # "latent decoupling": the a-only features' latents also write a stray copy into site b
    W_dec[a_only, 24:] = world.site_directions["a"][a_only].roll(1, 1) * 0.8
    r = crosscoder_recovery(Dictionary(W_dec.t(), W_dec), world)
    assert r.confusion["a_only"]["shared"] == 12 and r.category_accuracy["a_only"] == 0.0
    assert r.recovered["a_only"] < 1.0  # joint cosine 1 / sqrt(1 + 0.8^2) = 0.78
    assert r.relative_norm_error["a_only"] == pytest.approx(0.8 / 1.8, abs=1e-4)
    assert r.site_recovered["a"] == 1.0  # the a-part itself is right
    assert r.category_accuracy["shared"] == 1.0 and r.category_accuracy["b_only"] == 1.0


def test_category_thresholds_are_parameters():
    r = torch.tensor([0.05, 0.15, 0.35, 0.5, 0.75, 0.95])
    assert relative_norm_category(r) == ["a_only", "other", "shared", "shared", "other", "b_only"]
    assert relative_norm_category(r, a_max=0.2, b_min=0.7, shared_range=(0.4, 0.6)) == [
        "a_only",
        "a_only",
        "other",
        "shared",
        "b_only",
        "b_only",
    ]
    with pytest.raises(ConfigError, match="a_max"):
        relative_norm_category(r, a_max=0.5)
    world = CrosscoderWorld(CC)
    W_dec = world.directions
    strict = crosscoder_recovery(Dictionary(W_dec.t(), W_dec), world, shared_range=(0.45, 0.55))
    assert strict.category_accuracy["rescaled"] == 1.0  # expected categories follow the same thresholds
    assert strict.confusion["rescaled"]["other"] == 12


def test_relative_norms_and_matching_helpers():
    W_dec = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0]])
    assert relative_decoder_norms(Dictionary(W_dec.t(), W_dec), 2).tolist() == pytest.approx([0.0, 1.0, 0.5])
    m = match_directions(torch.tensor([[0.0, 0.0, 0.6, 0.8], [2.0, 0.0, 0.0, 0.0]]), W_dec)
    assert m.latents.tolist() == [1, 0]
    with pytest.raises(ConfigError, match="2 \\* d"):
        crosscoder_recovery(Dictionary(W_dec.t(), W_dec), CrosscoderWorld(CC))


# ---------------------------------------------------------------------------- in the evaluation record
def with_weights(W_enc: torch.Tensor, W_dec: torch.Tensor, **cfg):
    from saelab.sae.registry import create

    sae = create({"architecture": "relu", "d_in": W_enc.shape[0], "d_sae": W_enc.shape[1], **cfg})
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
    return sae


def test_evaluate_adds_crosscoder_recovery_for_a_crosscoder_world():
    from saelab.evals import evaluate

    world = CrosscoderWorld(CC)
    sae = with_weights(world.directions.t(), world.directions)
    batches = [world.sample(256, torch.Generator().manual_seed(i)) for i in range(2)]
    record = evaluate(sae, batches, world).as_dict()
    assert record["recovered_fraction"] == 1.0
    for cat in ("shared", "a_only", "b_only", "rescaled"):
        assert record[f"crosscoder_recovered_{cat}"] == 1.0 and record[f"crosscoder_category_accuracy_{cat}"] == 1.0
    assert "transcoder_output_recovered" not in record


def test_evaluate_adds_transcoder_recovery_for_a_transcoder_world():
    from saelab.evals import evaluate

    world = TranscoderWorld(TC)
    sites = {"site": "mlp_in", "write_site": "mlp_out", "d_out": 20}
    sae = with_weights(world.input_directions.t(), world.output_directions, **sites)
    batches = [world.sample(256, torch.Generator().manual_seed(i)) for i in range(2)]
    record = evaluate(sae, batches, world).as_dict()
    assert record["transcoder_encoder_recovered"] == 1.0 and record["transcoder_output_recovered"] == 1.0
    assert record["transcoder_both_recovered"] == 1.0
    assert record["recovered_fraction"] == 1.0  # the generic matching compares decoders with output directions
    assert math.isnan(record["mmcs_encoder"])  # encoder columns live in the input space: scored above instead
    assert "crosscoder_recovered_shared" not in record


# ---------------------------------------------------------------------------- trained dictionaries
TRAIN = {"steps": 800, "lr": 3e-3, "progress": False}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_topk_transcoder_recovers_most_input_and_output_directions(seed):
    import saelab
    from saelab.activations.factory import build_source

    world = {"n_in": 64, "d_in": 32, "n_out": 48, "d_out": 24, "firing_prob": 0.04, "seed": seed}
    src = build_source({"type": "transcoder_world", "batch_size": 512, "seed": seed, "world": world})
    sae = {"architecture": "topk", "d_in": 32, "d_out": 24, "d_sae": 128, "k": 4, "seed": seed}
    result = saelab.train({**sae, "site": "mlp_in", "write_site": "mlp_out"}, src, TRAIN)
    r = transcoder_recovery(result.sae, src.world)
    # Measured over seeds 0-7 (800 steps): output 0.95-1.0, mmcs_output 0.996-0.997, encoder
    # 0.84-0.94 (both = encoder: the latent that reads a feature also writes it). Encoder cosines
    # sit lower because with 64 features in 32 dims the best encoder is not E_in[i] itself but
    # tilted away from the features that interfere with it. Chance is 0 (see above).
    assert r.output_recovered >= 0.85 and r.mmcs_output >= 0.98
    assert r.encoder_recovered >= 0.7 and r.both_recovered >= 0.7


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "relu"])
def test_a_crosscoder_separates_shared_from_single_site_features(arch):
    import saelab
    from saelab.activations.factory import build_source

    src = build_source(
        {"type": "crosscoder_world", "batch_size": 512, "seed": 0, "world": {"d": 32, "firing_prob": 0.04}}
    )
    extra = {"k": 4} if arch == "batchtopk" else {}
    result = saelab.train({"architecture": arch, "d_in": 64, "d_sae": 160, "site": ["a", "b"], **extra}, src, TRAIN)
    r = crosscoder_recovery(result.sae, src.world)
    # Measured over seeds 0-3 (800 steps), both architectures: recovered 0.94-1.0 per category,
    # shared / a-only / b-only accuracy 0.94-1.0, no a <-> b confusion; chance is 0 for recovery
    # and for the single-site categories (see the random crosscoder above).
    assert min(r.recovered.values()) >= 0.75
    assert min(r.category_accuracy[c] for c in ("shared", "a_only", "b_only")) >= 0.85
    assert r.confusion["a_only"]["b_only"] == 0 and r.confusion["b_only"]["a_only"] == 0
    if arch == "batchtopk":
        # Rescaled features keep their relative norm (r 1/3 and 2/3): measured error 0.0005-0.001.
        assert r.category_accuracy["rescaled"] >= 0.85 and r.relative_norm_error["rescaled"] < 0.03
    else:
        # The L1 penalty on the sum of per-site decoder norms shrinks both parts of a latent by the
        # same amount, so the smaller part shrinks relatively more and r is pushed outwards
        # (measured: 1/3 -> 0.17-0.25, 2/3 -> 0.77-0.83, error 0.143-0.152, accuracy 0-0.06).
        assert r.relative_norm_error["rescaled"] > 0.08
        rescaled = src.world.category_indices("rescaled")
        r_latent = torch.tensor(r.latent_relative_norms)[torch.tensor(r.matched_latents)[rescaled]]
        r_true = src.world.relative_norms[rescaled]
        assert ((r_latent - 0.5).abs() > (r_true - 0.5).abs()).float().mean() >= 0.9


def test_saelab_run_trains_and_scores_a_transcoder_from_a_config(tmp_path):
    import saelab

    config = {
        "sae": {"architecture": "topk", "d_sae": 48, "k": 3, "site": "mlp_in",  # widths from the source
                "write_site": "mlp_out"},
        "source": {"type": "transcoder_world", "batch_size": 256,
                   "world": {"n_in": 24, "d_in": 16, "n_out": 20, "d_out": 12, "firing_prob": 0.05}},
        "train": {"steps": 300, "lr": 3e-3, "progress": False},
        "eval": {"batches": 2},
    }  # fmt: skip
    (record,) = saelab.run(config, out=tmp_path / "run")
    for key in ("transcoder_encoder_recovered", "transcoder_output_recovered", "transcoder_both_recovered", "fvu"):
        assert key in record
    assert record["transcoder_output_recovered"] > 0.5  # chance is 0; a short run gets most of 24 features


@pytest.mark.parametrize(
    "source, sae",
    [
        ({"type": "transcoder_world", "world": {"n_in": 24, "d_in": 16, "n_out": 20, "d_out": 12}}, {"d_in": 16}),
        ({"type": "transcoder_world", "world": {"n_in": 24, "d_in": 16, "n_out": 20, "d_out": 12}},
         {"d_in": 12, "site": "mlp_out"}),
        ({"type": "crosscoder_world", "world": {"d": 12, "n_shared": 8, "n_a_only": 4, "n_b_only": 4, "n_rescaled": 4}},
         {"d_in": 12, "site": "b"}),
    ],
)  # fmt: skip
def test_an_sae_on_one_site_of_these_worlds_is_scored_against_that_site(source, sae, tmp_path):
    import saelab

    config = {
        "sae": {"architecture": "topk", "d_sae": 48, "k": 3, **sae},
        "source": {**source, "batch_size": 256},
        "train": {"steps": 300, "lr": 3e-3, "progress": False},
        "eval": {"batches": 2},
    }
    (record,) = saelab.run(config, out=tmp_path / "run")
    # it reproduces the site it reads (without a site: the batch's own x, never the paired target)
    assert record["fvu"] < 0.5 and 0 < record["recovered_fraction"] <= 1
    assert "transcoder_output_recovered" not in record and "crosscoder_recovered_shared" not in record
