"""The toy world: firing statistics, magnitudes, interference, and a resumable stream."""

import pytest
import torch

from saelab.errors import ConfigError
from saelab.toys import ToySource, ToyWorld, ToyWorldConfig
from saelab.toys.features import embed_directions, firing_probabilities


def test_firing_frequencies_match_the_probabilities_within_sampling_error():
    world = ToyWorld({"n_features": 64, "d": 32, "firing": "zipf", "firing_prob": 0.05, "zipf_exponent": 1.0})
    n = 40_000
    feats = world.sample_features(n, torch.Generator().manual_seed(0))
    freq = (feats > 0).float().mean(0)
    p = world.probs
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all()  # 5 sigma per feature: a false alarm is ~1e-5
    assert p.mean().item() == pytest.approx(0.05, rel=1e-4)
    assert (p[:-1] >= p[1:]).all()  # Zipf: decreasing


def test_zipf_probabilities_are_clipped_at_one_keeping_the_mean():
    p = firing_probabilities(ToyWorldConfig(n_features=10, d=4, firing="zipf", firing_prob=0.5, zipf_exponent=3.0))
    assert p.max() <= 1.0 and p.mean().item() == pytest.approx(0.5, rel=1e-3)


def test_magnitudes_have_the_chosen_mean_and_std_and_are_non_negative():
    world = ToyWorld({"n_features": 16, "d": 16, "firing_prob": 0.5, "magnitude_mean": 2.0, "magnitude_std": 0.3})
    feats = world.sample_features(20_000, torch.Generator().manual_seed(1))
    active = feats[feats > 0]
    assert (feats >= 0).all()
    assert active.mean().item() == pytest.approx(2.0, abs=0.01)
    assert active.std().item() == pytest.approx(0.3, abs=0.01)


def test_activations_are_the_features_times_directions():
    world = ToyWorld({"n_features": 20, "d": 8})
    batch = world.sample(100, torch.Generator().manual_seed(2))
    torch.testing.assert_close(batch.x, batch.features @ world.directions)


def test_orthogonal_when_room_and_interference_near_target_otherwise():
    d = embed_directions(16, 32, 0.0, seed=0)
    torch.testing.assert_close(d @ d.t(), torch.eye(16), atol=1e-5, rtol=0)
    d = embed_directions(40, 64, 0.3, seed=0)
    cos = (d @ d.t())[~torch.eye(40, dtype=torch.bool)]
    assert cos.mean().item() == pytest.approx(0.3, abs=0.02)
    # n > d with target 0: far less interference than random directions (Welch bound is the floor)
    n, dim = 128, 32
    tight = embed_directions(n, dim, 0.0, seed=0)
    rand = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1)

    def sq(u):
        return (u @ u.t())[~torch.eye(n, dtype=torch.bool)].pow(2).mean().item()

    welch = (n - dim) / (dim * (n - 1))
    assert sq(tight) < 1.05 * welch < sq(rand)


def test_source_resumes_exactly_from_its_state():
    src = ToySource(ToyWorld({"n_features": 32, "d": 16}), batch_size=8, seed=3)
    for _ in range(5):
        next(src)
    state = src.state_dict()
    expected = [next(src).x for _ in range(3)]
    other = ToySource(ToyWorld({"n_features": 32, "d": 16}), batch_size=8, seed=3)
    other.load_state_dict(state)
    for e in expected:
        assert torch.equal(next(other).x, e)
    assert other.position == 8


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"firing_prob": 0}, "firing_prob"),
        ({"n_features": -3}, "n_features"),
        ({"magnitude_mean": -1.0}, "magnitude_mean"),
        ({"dim": 3}, "dim"),
        ({"target_cos_sim": 1.5}, "target_cos_sim"),
    ],
)
def test_bad_world_settings_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        ToyWorld(bad)
