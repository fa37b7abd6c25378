"""The registry's sweep planner: one rule for every architecture, multiplier > 1 = more active latents."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.evals import reconstruction_metrics
from saelab.sae.registry import get_class, register, sweep_setting
from saelab.sae.relu import ReLUSAE
from saelab.toys import ToySource, World

SWEPT = [
    a for a in saelab.list_architectures(one_stream=True) if get_class(a).sweep_parameter is not None
]  # toy worlds: one stream
WORLD = {"n_features": 32, "d": 16, "firing_prob": 0.1, "magnitude_std": 0.2, "seed": 0}


def test_every_swept_architecture_declares_how_its_parameter_varies():
    for arch in saelab.list_architectures():
        cls = get_class(arch)
        assert (cls.sweep_kind is None) == (cls.sweep_parameter is None), arch
        assert cls.sweep_kind in (None, "count", "coefficient"), arch


def test_counts_follow_the_true_l0_and_coefficients_their_default():
    assert sweep_setting("topk", 2.0, 3.2) == {"k": 6}
    assert sweep_setting("topk", 0.1, 3.2) == {"k": 1}  # never below one active latent
    default = get_class("relu").Config.model_fields["l1_coefficient"].default
    assert sweep_setting("relu", 1.0, 3.2) == {"l1_coefficient": default}
    assert sweep_setting("relu", 2.0, 3.2) == {"l1_coefficient": default / 2}
    assert sweep_setting("pca", 2.0, 3.2) == {}
    with pytest.raises(ConfigError, match="positive"):
        sweep_setting("relu", 0.0, 3.2)


def test_a_sweep_parameter_without_its_kind_is_refused_at_registration():
    class Undeclared(ReLUSAE):
        architecture = "undeclared_test_only"
        sweep_kind = None

    with pytest.raises(TypeError, match="sweep_kind"):
        register(Undeclared)

    class Misnamed(ReLUSAE):
        architecture = "misnamed_test_only"
        sweep_parameter = "l1_coef"

    with pytest.raises(TypeError, match="l1_coef"):
        register(Misnamed)
    assert "undeclared_test_only" not in saelab.list_architectures()


@pytest.mark.parametrize("arch", SWEPT)
def test_a_larger_multiplier_trains_an_sae_with_more_active_latents(arch):
    world = World(WORLD)
    held_out = [world.sample(512, torch.Generator().manual_seed(99))]
    l0 = {}
    for m in (0.5, 2.0):
        cfg = {"architecture": arch, "d_in": 16, "d_sae": 32, **sweep_setting(arch, m, world.expected_l0)}
        train = {"steps": 150, "lr": 1e-2, "progress": False, "lr_warmup_steps": 10, "sparsity_warmup_steps": 10}
        result = saelab.train(cfg, ToySource(world, 128, seed=1), train)
        l0[m] = reconstruction_metrics(result.sae, held_out).l0
    assert l0[2.0] > 1.5 * l0[0.5], l0  # four times the multiplier: far apart, not noise
