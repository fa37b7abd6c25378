"""What every world shares: feature directions with controlled interference, and a resumable stream."""

import pytest
import torch

from saelab.toys import ToySource, World
from saelab.toys.features import embed_directions


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
    src = ToySource(World({"n_features": 32, "d": 16}), batch_size=8, seed=3)
    for _ in range(5):
        next(src)
    state = src.state_dict()
    expected = [next(src).x for _ in range(3)]
    other = ToySource(World({"n_features": 32, "d": 16}), batch_size=8, seed=3)
    other.load_state_dict(state)
    for e in expected:
        assert torch.equal(next(other).x, e)
    assert other.position == 8
