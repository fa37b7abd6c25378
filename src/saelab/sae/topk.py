"""TopK (Gao et al. 2024, arXiv 2406.04093) and BatchTopK (Bussmann et al. 2024, arXiv 2412.06410).

TopK keeps the k largest pre-activations per token, so L0 = k with no sparsity penalty. BatchTopK
keeps the top B*k over the whole batch during training (L0 = k on average) and, at inference,
a single global threshold estimated during training, which makes it a JumpReLU with a shared
threshold; it is saved as one. Both use AuxK: the top k_aux *dead* latents reconstruct the
residual x - x_hat, so dead latents get a gradient. On top of it they resample dead latents
(`resample_dead`, see `SAE.resample`): AuxK's gradient reaches only dead latents with positive
pre-activations, and the small values it trains rarely clear BatchTopK's batch-wide cut, so on
toy worlds it alone leaves a third of the latents dead (benchmarks/revival.py). A resampled latent
is placed to clear the cut it competes against (`ResampleOption.after_resample`), because a
revived latent is not counted dead for a window and so gets no AuxK: unselected, it would get no
gradient at all (docs/results/revival.md).
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.errors import ConfigError
from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.sparse import Selection, SparseActs, select_batch_topk, select_topk, sparse_decode, use_sparse


class TopKConfig(SAEConfig):
    architecture: str = "topk"
    k: PositiveInt = Field(8, description="Active latents per token.")
    k_aux: PositiveInt | None = Field(None, description="Dead latents used by AuxK (default d_in // 2, at most 512).")
    aux_coefficient: NonNegativeFloat = Field(1 / 32, description="alpha on the AuxK loss.")
    resample_dead: bool = Field(
        True,
        description="Also resample dead latents towards badly reconstructed rows (as the threshold "
        "families do; see TrainConfig.revive_every_tokens), on top of AuxK, which alone does not "
        "bring them back on toy worlds (benchmarks/revival.py).",
    )

    @model_validator(mode="after")
    def _k_fits(self):
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}; choose k <= d_sae")
        return self

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(512, self.d_in // 2))


class ResampleOption:
    """Mixin: the TopK family resamples dead latents only when its config asks (`resample_dead`),
    and only a class that declares `resamples_dead` itself can (an archetypal dictionary, whose
    rows are tied to the data's hull, cannot)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.resample_dead and not vars(type(self)).get("resamples_dead", False):
            raise ConfigError(f"architecture '{self.architecture}' cannot resample dead latents; drop resample_dead")

    @property
    def revives_by_resampling(self) -> bool:
        return self.cfg.resample_dead

    # a resampled latent reads its residual's direction and is scaled to clear the cut (below)
    RESAMPLE_ENCODER_FROM = "residual"

    def selection_cut(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """[n] the value a latent must exceed to be selected on each of `rows`: the k-th largest
        pre-activation of the other latents there (TopK's per-token cut)."""
        pre = self.pre_acts(rows)
        pre[:, latents] = float("-inf")
        return pre.topk(self.cfg.k, dim=-1).values[:, -1].clamp_min(0)

    @torch.no_grad()
    def after_resample(self, latents: torch.Tensor, preact_on_row: torch.Tensor, rows: torch.Tensor) -> None:
        """Scale a resampled latent's encoder column so its pre-activation on its own row is
        `RESAMPLE_MARGIN` times the cut there (`selection_cut`): it is selected on its row and on
        rows that carry the same missing feature at half the size, and so gets the
        reconstruction's gradient at once. At Bricken et al.'s 0.2 of the alive encoder norm it
        would rarely make the top k, and AuxK, which trains only latents counted dead, skips it
        for the whole window after its revival: it would die again untrained."""
        if scores_by_contribution(self):  # crosscoders select on norm-scaled codes: leave as drawn
            return
        cut = self.selection_cut(rows, latents)
        factor = self.RESAMPLE_MARGIN * cut.clamp_min(1e-6) / preact_on_row.clamp_min(1e-12)
        self.W_enc[:, latents] *= factor.to(self.W_enc.dtype)


def scatter_topk(values: torch.Tensor, k: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU of the entries of each row with the k largest `scores` (default: the values themselves),
    zeros elsewhere."""
    if scores is None:
        top, idx = values.topk(k, dim=-1, sorted=False)
    else:
        idx = scores.topk(k, dim=-1, sorted=False).indices
        top = values.gather(-1, idx)
    return torch.zeros_like(values).scatter_(-1, idx, torch.relu(top))


def scores_by_contribution(sae: SAE) -> bool:
    """Whether latents compete on f_i * |d_i| rather than f_i: for a crosscoder with free rows,
    whose per-site norms say how much a latent writes (its BatchTopK selection and threshold
    are on these scaled codes). A single site keeps raw codes, as SAELens and sparsify do."""
    return sae.cfg.decoder_norm != "unit" and sae.cfg.n_sites > 1


def selection_scores(sae: SAE, pre: torch.Tensor) -> torch.Tensor:
    """What latents compete on: the pre-activation, times the (training-space) decoder norm when
    `scores_by_contribution`."""
    return pre * sae.decoder_norms().detach() if scores_by_contribution(sae) else pre


def auxk_loss(sae: SAE, pre: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Reconstruct the target's residual from the top-k_aux dead latents; zero when none are dead.

    The squared error is not normalised by the residual's variance as in Gao et al.: a
    per-batch normaliser differs between data-parallel shards and the combined batch, and the
    latents AuxK trains get no other gradient, so under Adam its scale barely moves them.
    Only the dead columns of `pre` are searched and only the chosen entries get a gradient: through
    `pre`'s own graph when it has one, else through the sparse encoder backward.
    """
    dead = ctx.dead_mask
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(sae.cfg.effective_k_aux, n_dead)
    dead_cols = dead.to(pre.device).nonzero().squeeze(1)
    local = pre.detach().index_select(1, dead_cols).topk(k_aux, dim=-1, sorted=False).indices
    sel = Selection(dead_cols[local], None, pre.shape[0], pre.shape[1])
    values = sel.gather(pre) if pre.requires_grad else sae.preacts_with_grad(pre, x, sel)
    residual = (ctx.target_for(x) - x_hat).detach()  # what the live latents left of the target
    scale = min(n_dead / sae.cfg.effective_k_aux, 1.0)  # few dead latents: a proportionally smaller term
    return sae.cfg.aux_coefficient * scale * mse_per_token(sparse_decode(sel, torch.relu(values), sae.W_dec), residual)


def selected_latents(
    sae: SAE, x: torch.Tensor, pre: torch.Tensor, sel: Selection
) -> tuple[torch.Tensor, Selection | None, torch.Tensor | SparseActs]:
    """ReLU of the pre-activations chosen at `sel` (from `pre`, computed without a graph), with
    the encoder's gradient: the values at `sel` on the sparse path, or the dense [B, d_sae] latents
    (and `sel` None) when `kernel_mode("dense")` asks for the reference. Also the detached latents
    for the trainer's statistics."""
    if use_sparse(sel.cols.numel(), pre.numel(), always_sparse=True):
        values = torch.relu(sae.preacts_with_grad(pre, x, sel))
        return values, sel, SparseActs(sel, values.detach())
    f = sel.to_dense(torch.relu(sel.gather(sae.preacts_with_grad(pre, x))))
    return f, None, f.detach()


def selected_step(sae: SAE, x: torch.Tensor, pre: torch.Tensor, sel: Selection, ctx: StepContext) -> TrainOutput:
    """The TopK-family training step on latents already chosen from `pre`: decoded, plus AuxK."""
    tokens = getattr(ctx.batch, "tokens", None)
    f, sel, acts = selected_latents(sae, x, pre, sel)
    x_hat = sae.decode(f, tokens) if sel is None else sae.decode_selected(sel, f, tokens)
    return TrainOutput(
        x_hat, acts, {"mse": mse_per_token(x_hat, ctx.target_for(x)), "auxk": auxk_loss(sae, pre, x, x_hat, ctx)}
    )


@torch.no_grad()
def track_threshold(threshold: torch.Tensor, scores: torch.Tensor, momentum: float) -> None:
    """BatchTopK's inference threshold: an EMA of the smallest score kept in each batch (the
    first batch's value outright while `threshold` is still negative, i.e. not estimated)."""
    kept = scores[scores > 0]
    if kept.numel() == 0:
        return
    smallest = kept.min()
    if threshold < 0:
        threshold.copy_(smallest)
    else:
        threshold.mul_(momentum).add_((1 - momentum) * smallest)


@register
class TopKSAE(ResampleOption, SAE):
    architecture = "topk"
    Config = TopKConfig
    sweep_parameter = "k"
    sweep_kind = "count"
    transcodes = True
    crosscodes = True
    resamples_dead = True

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        scores = selection_scores(self, pre) if scores_by_contribution(self) else None
        return scatter_topk(pre, self.cfg.k, scores)

    def saved_config_extras(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}  # SAELens' TopK keys

    @classmethod
    def config_from_saved(cls, saved_cfg: dict, values: dict) -> dict:
        return {"k": int(saved_cfg.get("k", values.get("k", 100)))}  # 100 is SAELens' default

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        return selected_step(self, x, pre, select_topk(selection_scores(self, pre), self.cfg.k), ctx)


class BatchTopKConfig(TopKConfig):
    architecture: str = "batchtopk"
    threshold_momentum: float = Field(
        0.99, ge=0.0, lt=1.0, description="EMA momentum of the inference threshold (min kept activation per batch)."
    )


@register
class BatchTopKSAE(ResampleOption, SAE):
    architecture = "batchtopk"
    Config = BatchTopKConfig
    sweep_parameter = "k"
    sweep_kind = "count"
    transcodes = True
    crosscodes = True
    resamples_dead = True

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # Global inference threshold; negative means "not yet estimated" (inference is then plain ReLU).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def selection_cut(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The inference threshold once estimated (the batch's top-B*k cut follows it), else
        TopK's per-row cut."""
        if self.threshold > 0:
            return self.threshold.expand(rows.shape[0])
        return super().selection_cut(rows, latents)

    def select(self, pre: torch.Tensor) -> Selection:
        """The top B*k pre-activations of the batch (by `selection_scores`)."""
        return select_batch_topk(selection_scores(self, pre.detach()), self.cfg.k * pre.shape[0])

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        sel = self.select(pre)
        return sel.to_dense(torch.relu(sel.gather(pre)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.batch_topk(pre)
        return pre * (selection_scores(self, pre) > self.threshold.clamp_min(0)).to(pre.dtype)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        return selected_step(self, x, pre, self.select(pre), ctx)

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        super().after_optimizer_step(out)
        f = out.feature_acts
        if not scores_by_contribution(self):
            acts = f.values if isinstance(f, SparseActs) else f
        else:  # the threshold is on the scores latents were selected by
            norms = self.decoder_norms()
            acts = f.values * norms[f.selection.flat_cols] if isinstance(f, SparseActs) else f * norms
        track_threshold(self.threshold, acts, self.cfg.threshold_momentum)

    def saved_architecture(self) -> str:
        return "jumprelu"

    @classmethod
    def config_from_saved(cls, saved_cfg: dict, values: dict) -> dict:
        """k from a SAELens BatchTopK-family training checkpoint (saelab's own files keep theirs)."""
        return {"k": int(saved_cfg.get("k", values.get("k", 100)))}

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        theta = state.pop("threshold").clamp_min(0).expand(self.cfg.d_sae)
        if scores_by_contribution(self):  # pre * |d_i| > theta  <=>  pre > theta / |d_i|
            theta = theta / self.decoder_norms().detach().clamp_min(1e-12)
        state["threshold"] = theta.clone()
        return state

    def load_saved_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")
        if threshold.dim() == 1:
            if not torch.all(threshold == threshold[0]):
                raise ConfigError("a BatchTopK SAE needs one shared threshold; this file has per-latent thresholds")
            threshold = threshold[0]
        tensors["threshold"] = threshold
        super().load_saved_state(tensors)
