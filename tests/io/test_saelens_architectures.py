"""The SAELens v6 architectures beyond the basic four: BatchTopK and Matryoshka BatchTopK training
checkpoints, and matching pursuit, each compared with sae-lens' own forward pass."""

from __future__ import annotations

import json

import pytest
import torch

import saelab
from saelab.errors import FileFormatError
from tests.io.test_formats import D_IN, D_SAE, assert_matches, fired_fraction, inputs, reference_library


def _randomise(sae, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(scale * torch.randn_like(p))


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("matryoshka", [False, True])
def test_batchtopk_family_training_checkpoint_matches_sae_lens_inference_export(matryoshka, rescale, tmp_path):
    reference_library("sae_lens")
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    common = {"d_in": D_IN, "d_sae": D_SAE, "k": 3, "rescale_acts_by_decoder_norm": rescale}
    if matryoshka:
        theirs = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[4, 9, 15], **common)
        )
    else:
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    _randomise(theirs)
    theirs.topk_threshold = torch.tensor(1.2, dtype=torch.double)
    theirs.save_model(str(tmp_path / "training"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    reference = SAE.load_from_disk(str(tmp_path / "inference"), device="cpu")
    ours = saelab.load(tmp_path / "training")
    assert ours.architecture == ("matryoshka" if matryoshka else "batchtopk") and ours.cfg.k == 3
    if matryoshka:
        assert ours.cfg.prefixes == [4, 9, 15]
    x = inputs(256)
    with torch.no_grad():
        f_ref = reference.encode(x)
        assert 0.02 < fired_fraction(f_ref) < 0.98
        assert_matches(ours.encode(x), f_ref, "batchtopk-family encode")
        assert_matches(ours(x), reference(x), "batchtopk-family forward")
    assert ("decoder_norm" in ours.provenance.get("folded_scaling", {})) == rescale


def _unit_rows(sae) -> None:
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"residual_threshold": 0.0, "stop_on_duplicate_support": False, "max_iterations": 3},
        {"apply_b_dec_to_input": False},
    ],
)
def test_matching_pursuit_saved_by_sae_lens_matches_sae_lens(settings, tmp_path):
    reference_library("sae_lens")
    from sae_lens import MatchingPursuitSAE, MatchingPursuitSAEConfig

    theirs = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D_IN, d_sae=D_SAE, **settings))
    _randomise(theirs)
    _unit_rows(theirs)
    theirs.save_model(str(tmp_path))
    ours = saelab.load(tmp_path)
    assert ours.architecture == "matching_pursuit"
    x = inputs(256)
    with torch.no_grad():
        assert_matches(ours.encode(x), theirs.encode(x), f"matching pursuit encode {settings}")
        assert_matches(ours(x), theirs(x), f"matching pursuit forward {settings}")


def test_saelab_matching_pursuit_loads_in_sae_lens_with_the_same_codes(tmp_path):
    sae_lens = reference_library("sae_lens")
    ours = saelab.create({"architecture": "matching_pursuit", "d_in": D_IN, "d_sae": D_SAE, "k": 3})
    _randomise(ours)
    _unit_rows(ours)
    saelab.save(ours.eval(), tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = inputs(256)
    with torch.no_grad():
        assert_matches(ours.encode(x), theirs.encode(x), "saelab MP read by SAELens")
        assert_matches(ours(x), theirs(x), "saelab MP forward in SAELens")


def test_sae_lens_matching_pursuit_with_non_unit_atoms_is_refused(tmp_path):
    reference_library("sae_lens")
    from sae_lens import MatchingPursuitSAE, MatchingPursuitSAEConfig

    theirs = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(theirs)
    theirs.save_model(str(tmp_path))
    with pytest.raises(FileFormatError, match="unit-norm decoder rows"):
        saelab.load(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "matching_pursuit"
