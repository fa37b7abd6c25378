"""p-annealing: schedule from 1 to p_end, penalty continuity at each change, bad p."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.sae import StepContext
from saelab.sae.panneal import lp_penalty


def make(**extra):
    return saelab.create({"architecture": "relu_panneal", "d_in": 12, "d_sae": 32, **extra})


def test_schedule_starts_at_one_and_reaches_p_end():
    sae = make(p_end=0.4, p_updates=3, anneal_start_fraction=0.25, anneal_end_fraction=0.75)
    ps = [sae.scheduled_p(s, 100) for s in range(100)]
    assert ps[0] == 1.0 and ps[24] == 1.0 and ps[-1] == pytest.approx(0.4)
    assert all(b <= a for a, b in zip(ps, ps[1:])) and len(set(ps)) == 4


def test_coefficient_is_rescaled_so_the_penalty_does_not_jump_when_p_changes():
    sae = make(p_end=0.5, p_updates=1, anneal_start_fraction=0.5, anneal_end_fraction=1.0)
    x = 3 * torch.randn(256, 12)
    before = sae.loss_terms(x, StepContext(step=49, total_steps=100)).losses["lp"]
    after = sae.loss_terms(x, StepContext(step=50, total_steps=100)).losses["lp"]
    assert float(sae.p) == 0.5 and float(sae.coefficient_scale) != 1.0
    torch.testing.assert_close(after, before)


def test_lp_penalty_has_finite_gradient_at_zero():
    a = torch.tensor([[0.0, 0.5, 2.0]], requires_grad=True)
    lp_penalty(a, 0.5).backward()
    assert torch.isfinite(a.grad).all() and a.grad[0, 0] == 0


@pytest.mark.parametrize("p_end", [0.0, 1.5, -0.2])
def test_p_outside_zero_one_is_rejected(p_end):
    with pytest.raises(ConfigError, match="p_end"):
        make(p_end=p_end)


def test_saved_as_a_plain_relu_sae(tmp_path):
    sae = make().eval()
    saelab.save(sae, tmp_path / "s")
    loaded = saelab.load(tmp_path / "s")
    assert loaded.architecture == "relu"
    x = torch.randn(20, 12)
    assert torch.equal(loaded(x), sae(x))
