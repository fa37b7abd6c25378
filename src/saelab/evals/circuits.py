"""Recovery metrics for transcoders and crosscoders against the worlds of `saelab.toys.circuits`.

Both read only the dictionary's weights (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`) and match
true features to latents one-to-one with the Hungarian matching of `saelab.evals.core`, so a
duplicated latent cannot count twice.

- `transcoder_recovery`: does a latent read input feature i (encoder column along E_in[i]), does a
  latent write its output direction (decoder row along v_i), and does one latent do both?
- `crosscoder_recovery`: per feature category, is the feature recovered (joint decoder row along
  its joint direction), and which category does its latent's relative decoder norm
  r = |d_b| / (|d_a| + |d_b|) assign it (a-only r < a_max, b-only r > b_min, shared within
  `shared_range`, else "other")?
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.evals.core import Matching, match_latents, unit_rows


def match_directions(true: torch.Tensor, learned: torch.Tensor) -> Matching:
    """Match unit true directions [n, d] to learned latent directions [d_sae, d] one-to-one by cosine."""
    u = unit_rows(true.detach().float().cpu())
    cos = u @ unit_rows(learned.detach().float().cpu()).t()
    return Matching(u, cos, match_latents(cos))


def _matched(cos: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Each row's cosine with its matched latent (-1 where it has none)."""
    out = torch.full((cos.shape[0],), -1.0)
    have = latents >= 0
    out[have] = cos[have, latents[have]]
    return out


def _weights(sae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder directions [d_sae, d_in] (columns of W_enc) and decoder rows [d_sae, d_out]."""
    return sae.W_enc.detach().float().cpu().t(), sae.W_dec.detach().float().cpu()


# ---------------------------------------------------------------------------- transcoders
@dataclass
class TranscoderRecovery:
    encoder_recovered: float  # input features matched to a latent whose encoder column has cos >= threshold
    output_recovered: float  # input features matched to a latent whose decoder row has cos >= threshold with v_i
    both_recovered: float  # input features with one latent doing both (matched on the smaller cosine)
    mmcs_encoder: float  # mean over input features of the max encoder cosine
    mmcs_output: float  # mean over input features of the max decoder cosine with v_i
    threshold: float
    encoder_cosines: list[float] = field(repr=False, default_factory=list)  # per feature, its match's
    output_cosines: list[float] = field(repr=False, default_factory=list)
    matched_latents: list[int] = field(repr=False, default_factory=list)  # the latent of `both` (-1: none)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def transcoder_recovery(sae: Any, world: Any, threshold: float = 0.9) -> TranscoderRecovery:
    """Compare a transcoder with a `TranscoderWorld`'s `input_directions` and `output_directions`.

    Encoder and output recovery each use their own one-to-one matching; `both_recovered` matches
    on min(encoder cos, decoder cos), so it counts features one latent reads *and* writes right.
    """
    enc, dec = _weights(sae)
    true_in, true_out = world.input_directions, world.output_directions
    if enc.shape[1] != true_in.shape[1] or dec.shape[1] != true_out.shape[1]:
        raise ConfigError(
            f"the dictionary reads width {enc.shape[1]} and writes width {dec.shape[1]}, but the world's "
            f"sites are d_in={true_in.shape[1]}, d_out={true_out.shape[1]}; train it on this world's "
            "mlp_in -> mlp_out"
        )
    m_in, m_out = match_directions(true_in, enc), match_directions(true_out, dec)
    both = torch.minimum(m_in.cosines, m_out.cosines)
    latents = match_latents(both)
    enc_cos, out_cos = _matched(m_in.cosines, m_in.latents), _matched(m_out.cosines, m_out.latents)
    return TranscoderRecovery(
        encoder_recovered=float((enc_cos >= threshold).float().mean()),
        output_recovered=float((out_cos >= threshold).float().mean()),
        both_recovered=float((_matched(both, latents) >= threshold).float().mean()),
        mmcs_encoder=float(m_in.cosines.max(1).values.mean()),
        mmcs_output=float(m_out.cosines.max(1).values.mean()),
        threshold=threshold,
        encoder_cosines=enc_cos.tolist(),
        output_cosines=out_cos.tolist(),
        matched_latents=latents.tolist(),
    )


# ---------------------------------------------------------------------------- crosscoders
ASSIGNED = ("a_only", "b_only", "shared", "other")


def relative_norm_category(
    r: torch.Tensor, a_max: float = 0.1, b_min: float = 0.9, shared_range: tuple[float, float] = (0.3, 0.7)
) -> list[str]:
    """The category a relative decoder norm r = |d_b| / (|d_a| + |d_b|) assigns (one of ASSIGNED)."""
    lo, hi = shared_range
    if not 0 <= a_max <= lo <= hi <= b_min <= 1:
        raise ConfigError(
            f"thresholds must satisfy 0 <= a_max <= shared_range[0] <= shared_range[1] <= b_min <= 1 "
            f"(got a_max={a_max}, shared_range={shared_range}, b_min={b_min})"
        )
    from saelab.diffing.crosscoder import Thresholds, categorize

    names = {"base_only": "a_only", "ft_only": "b_only"}  # the diff's categories under this world's names
    return [names.get(c, c) for c in categorize(r, Thresholds(a_max, b_min, (lo, hi)))]


def relative_decoder_norms(sae: Any, d_a: int) -> torch.Tensor:
    """[d_sae] r = |d_b| / (|d_a| + |d_b|) of each latent, its decoder row split as [d_a | d_b]."""
    dec = sae.W_dec.detach().float().cpu()
    na, nb = dec[:, :d_a].norm(dim=1), dec[:, d_a:].norm(dim=1)
    return nb / (na + nb).clamp_min(1e-12)


@dataclass
class CrosscoderRecovery:
    recovered: dict[str, float]  # per true category: fraction with a matched latent of joint decoder cos >= threshold
    category_accuracy: dict[str, float]  # per true category: matched latents assigned the category its true r gives
    confusion: dict[str, dict[str, int]]  # true category -> assigned category (by the latent's r) -> features
    relative_norm_error: dict[str, float]  # per true category: mean |r(latent) - r(true)| over matched features
    site_recovered: dict[str, float]  # per site: features present there whose latent's site part has cos >= threshold
    threshold: float
    a_max: float
    b_min: float
    shared_range: tuple[float, float]
    matched_latents: list[int] = field(repr=False, default_factory=list)
    latent_relative_norms: list[float] = field(repr=False, default_factory=list)  # r of every latent

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def crosscoder_recovery(
    sae: Any,
    world: Any,
    threshold: float = 0.9,
    a_max: float = 0.1,
    b_min: float = 0.9,
    shared_range: tuple[float, float] = (0.3, 0.7),
    min_cos: float = 0.0,
) -> CrosscoderRecovery:
    """Compare a crosscoder over sites (a, b) with a `CrosscoderWorld`.

    True features are matched one-to-one to latents by the cosine of their joint directions
    [d_a | d_b] with the decoder rows. The confusion and category accuracy count every matched
    feature whose cosine is at least `min_cos` (default: all), so a single-site feature that a
    latent writes to both sites shows up as confused even when its joint cosine is low.
    """
    _, dec = _weights(sae)
    d = world.cfg.d
    if dec.shape[1] != 2 * d:
        raise ConfigError(
            f"the dictionary writes width {dec.shape[1]}, but a crosscoder over this world's sites a and b writes "
            f"2 * d = {2 * d}; read and write site: [a, b]"
        )
    m = match_directions(world.directions, dec)
    cos = _matched(m.cosines, m.latents)
    r_latent = relative_decoder_norms(sae, d)
    thresholds = dict(a_max=a_max, b_min=b_min, shared_range=tuple(shared_range))
    expected = relative_norm_category(world.relative_norms, **thresholds)
    counted = (m.latents >= 0) & (cos >= min_cos)
    assigned = [None] * len(cos)
    idx = torch.nonzero(counted).flatten()
    for i, a in zip(idx.tolist(), relative_norm_category(r_latent[m.latents[idx]], **thresholds), strict=True):
        assigned[i] = a
    present = sorted(set(world.categories), key=list(world.categories).index)
    recovered, accuracy, confusion, r_error = {}, {}, {}, {}
    for cat in present:
        rows = [i for i, c in enumerate(world.categories) if c == cat]
        recovered[cat] = float((cos[rows] >= threshold).float().mean())
        seen = [i for i in rows if assigned[i] is not None]
        confusion[cat] = {a: sum(assigned[i] == a for i in seen) for a in ASSIGNED}
        accuracy[cat] = sum(assigned[i] == expected[i] for i in seen) / len(seen) if seen else float("nan")
        err = [abs(float(r_latent[m.latents[i]]) - float(world.relative_norms[i])) for i in seen]
        r_error[cat] = sum(err) / len(err) if err else float("nan")
    site_recovered = {}
    for k, site in enumerate(("a", "b")):
        true = world.site_directions[site]
        here = world.site_scales[site] > 0
        have = here & (m.latents >= 0)
        part = unit_rows(dec[m.latents[have], k * d : (k + 1) * d])
        site_cos = (unit_rows(true[have]) * part).sum(1)
        n_here = int(here.sum())
        site_recovered[site] = float((site_cos >= threshold).sum()) / n_here if n_here else float("nan")
    return CrosscoderRecovery(
        recovered=recovered,
        category_accuracy=accuracy,
        confusion=confusion,
        relative_norm_error=r_error,
        site_recovered=site_recovered,
        threshold=threshold,
        matched_latents=m.latents.tolist(),
        latent_relative_norms=r_latent.tolist(),
        **thresholds,
    )
