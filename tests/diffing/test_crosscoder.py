"""Crosscoder diffing on hand-built crosscoders: relative norms, categories, Latent Scaling, files."""

import json

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.diffing import (
    Thresholds,
    categorize,
    closed_form_beta,
    decoder_cosines,
    diff_crosscoder,
    latent_scaling,
    model_slots,
    relative_norms,
)
from saelab.diffing.report import PLOTS, write_report
from saelab.errors import ConfigError

D = 4  # width of each model's site


def hand_built(norms: list[tuple[float, float]], sites=("base/h", "ft/h")) -> saelab.SAE:
    """A ReLU crosscoder with latent j's decoder part along e_j in each site, of the given norms."""
    sae = saelab.create({"architecture": "relu", "d_in": 2 * D, "d_sae": len(norms), "site": list(sites)})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        for j, (nb, nf) in enumerate(norms):
            sae.W_dec[j, j % D] = nb
            sae.W_dec[j, D + j % D] = nf
            sae.W_enc[j % D, j] = 1.0  # encoder reads the base part, so a latent fires when its base coordinate does
            sae.W_enc[D + j % D, j] = 1.0
    return sae


def test_closed_form_beta_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        n, dim = 200, 7
        f = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
        d = torch.randn(dim, generator=g)
        y = 0.7 * f[:, None] * d + 0.3 * torch.randn(n, dim, generator=g)
        active = f > 0
        design = (f[active, None] * d).reshape(-1, 1)  # beta multiplies f_n d for every coordinate
        lstsq = torch.linalg.lstsq(design.double(), y[active].reshape(-1, 1).double()).solution.item()
        assert closed_form_beta(f, y, d).item() == pytest.approx(lstsq, rel=1e-5)
        # inactive tokens add nothing
        assert closed_form_beta(f[active], y[active], d).item() == pytest.approx(lstsq, rel=1e-5)


def test_relative_norms_and_categories_of_a_hand_built_crosscoder():
    norms = [(1.0, 0.0), (0.05, 0.95), (1.0, 1.0), (0.35, 0.65), (0.2, 0.8), (0.0, 2.0)]
    sae = hand_built(norms)
    r = relative_norms(sae)
    expected = torch.tensor([nf / (nb + nf) for nb, nf in norms])
    torch.testing.assert_close(r, expected)
    assert categorize(r) == ["base_only", "ft_only", "shared", "shared", "other", "ft_only"]
    assert categorize(r, Thresholds(ft_min=0.75, shared=(0.45, 0.55))) == [
        "base_only",
        "ft_only",
        "shared",
        "other",
        "ft_only",
        "ft_only",
    ]
    cos = decoder_cosines(sae)
    assert cos[2] == pytest.approx(1.0) and cos[0] == 0.0  # base-only: no ft part


def test_norms_are_read_in_the_training_space():
    """A model twice as large in raw units (folded site scale 1/2) does not bias r."""
    sae = hand_built([(1.0, 1.0), (1.0, 3.0)])
    sae.fold_scales(torch.tensor([1.0] * D + [0.5] * D), torch.tensor([1.0] * D + [0.5] * D))
    assert float(sae.W_dec.detach()[0, D:].norm()) == pytest.approx(2.0)  # raw: the ft part looks twice as large
    torch.testing.assert_close(relative_norms(sae), torch.tensor([0.5, 0.75]))


def test_sites_are_found_by_alias_and_bad_ones_named():
    assert model_slots(hand_built([(1, 1)], sites=("ft/h", "base/h"))) == (1, 0)
    assert model_slots(hand_built([(1, 1)], sites=("a", "b"))) == (0, 1)
    assert model_slots(hand_built([(1, 1)], sites=("a", "b")), base="b") == (1, 0)
    with pytest.raises(ConfigError, match="names 0"):
        model_slots(hand_built([(1, 1)], sites=("a", "b")), base="c")
    sae = saelab.create({"architecture": "relu", "d_in": 4, "d_sae": 3})
    with pytest.raises(ConfigError, match="crosscoder over one site per model"):
        model_slots(sae)


def _batches(sae_norms, n=400, seed=0, base_extra=None):
    """Tokens where latent j's base coordinate fires with magnitude f; the models write f * parts.

    `base_extra[j]` adds that multiple of the latent's direction to the base activations only
    (something the crosscoder's base part does not reproduce: it stays in the base error)."""
    g = torch.Generator().manual_seed(seed)
    m = len(sae_norms)
    f = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.3)
    base, ft = torch.zeros(n, D), torch.zeros(n, D)
    for j, (nb, nf) in enumerate(sae_norms):
        extra = (base_extra or {}).get(j, 0.0)
        base[:, j % D] += f[:, j] * (nb + extra)
        ft[:, j % D] += f[:, j] * nf
    return [Batch(x=torch.cat([base, ft], 1), sites={"base/h": base, "ft/h": ft})], f


def test_latent_scaling_on_known_activations():
    # latent 0: truly ft-only; latent 1: ft-only by its decoder, but the base writes 0.4 of it
    # anyway (Complete Shrinkage: its base error holds the direction)
    norms = [(0.0, 1.0), (0.0, 1.0)]
    sae = hand_built(norms)
    with torch.no_grad():
        sae.W_enc[:D].zero_()  # read the fine-tune only, so the base's extra does not change the codes
        sae.W_enc[D + 1, 0] = 0.0
    batches, f = _batches([(0.0, 1.0), (0.0, 1.0)], base_extra={1: 0.4})
    sae.W_dec.data[1, D + 1] = 1.0
    s = latent_scaling(sae, batches, [0, 1], [1, 1])
    # the ft reconstruction and error give beta 1 (exact); base error beta is the extra 0.4
    assert s.beta_recon[0][1] == pytest.approx(1.0, abs=1e-5)
    assert s.beta_error[1][1] == pytest.approx(1.0, abs=1e-5)
    assert s.nu_eps[0] == pytest.approx(0.0, abs=1e-6) and s.nu_r[0] == pytest.approx(0.0, abs=1e-6)
    assert s.nu_eps[1] == pytest.approx(0.4, abs=1e-5) and s.complete_shrinkage == [False, True]
    assert s.latent_decoupling == [False, False]


def test_latent_decoupling_is_flagged_when_another_latent_writes_the_direction():
    # latent 0 is ft-only; latent 1 is base-only along the same coordinate and fires with it
    sae = hand_built([(0.0, 1.0), (1.0, 0.0)])
    with torch.no_grad():
        sae.W_dec[1].zero_()
        sae.W_dec[1, 0] = 1.0  # base part along coordinate 0, latent 0's direction
        sae.W_enc.zero_()
        sae.W_enc[D, 0] = 1.0  # both read the ft coordinate 0
        sae.W_enc[D, 1] = 1.0
    g = torch.Generator().manual_seed(0)
    f = torch.rand(300, generator=g) * (torch.rand(300, generator=g) < 0.4)
    base, ft = torch.zeros(300, D), torch.zeros(300, D)
    base[:, 0], ft[:, 0] = f, f
    s = latent_scaling(sae, [Batch(x=torch.cat([base, ft], 1), sites={"base/h": base, "ft/h": ft})], [0], [1])
    assert s.nu_r[0] == pytest.approx(1.0, abs=1e-5) and s.latent_decoupling == [True]
    assert s.nu_eps[0] == pytest.approx(0.0, abs=1e-5)


def test_diff_and_report_files(tmp_path):
    norms = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.9)]
    sae = hand_built(norms)
    batches, _ = _batches(norms)
    res = diff_crosscoder(sae, batches)
    assert res.counts == {"base_only": 1, "ft_only": 1, "shared": 2, "other": 0} and res.dead == 0
    assert res.sites == {"base": "base/h", "ft": "ft/h"}
    assert res.scaling.latents == [0, 1] and res.scaling.category == ["base_only", "ft_only"]
    assert res.shared_cosine["n"] == 2 and res.shared_cosine["mean"] == pytest.approx(1.0)
    assert res.firing["joint"][0] > 0.2 and res.firing["ft"][0] == 0.0  # latent 0 reads the base only...
    paths = write_report(res, tmp_path / "out")
    for name in ("results.json", "report.md", "report.html", *PLOTS):
        assert paths[name].exists() and paths[name].stat().st_size > 0, name
        if name.endswith(".png"):
            assert paths[name].read_bytes()[:4] == b"\x89PNG"
    text = paths["results.json"].read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds bare {c}, not JSON"))
    assert saved["counts"] == res.counts and len(saved["relative_norms"]) == 4
    md = paths["report.md"].read_text()
    assert "Latent Scaling" in md and "| 1 | ft_only |" in md
    with pytest.raises(ConfigError, match="at least one batch"):
        diff_crosscoder(sae, [])
