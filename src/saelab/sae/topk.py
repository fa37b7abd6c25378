"""TopK (Gao et al. 2024, arXiv 2406.04093) and BatchTopK (Bussmann et al. 2024, arXiv 2412.06410).

TopK keeps the k largest pre-activations per token, so L0 = k with no sparsity penalty. BatchTopK
keeps the top B*k over the whole batch during training (L0 = k on average) and, at inference,
a single global threshold estimated during training, which makes it a JumpReLU with a shared
threshold; it is saved as one. Both use AuxK: the top k_aux *dead* latents reconstruct the
residual x - x_hat, so dead latents get a gradient.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.errors import ConfigError
from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register


class TopKConfig(SAEConfig):
    architecture: str = "topk"
    k: PositiveInt = Field(8, description="Active latents per token.")
    k_aux: PositiveInt | None = Field(None, description="Dead latents used by AuxK (default d_in // 2, at most 512).")
    aux_coefficient: NonNegativeFloat = Field(1 / 32, description="alpha on the AuxK loss.")

    @model_validator(mode="after")
    def _k_fits(self):
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}; choose k <= d_sae")
        return self

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(512, self.d_in // 2))


def scatter_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the k largest entries of each row, zeros elsewhere."""
    top, idx = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter_(-1, idx, torch.relu(top))


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]], i.e. f @ W_dec for k-sparse rows of f.

    `embedding_bag` gathers the k chosen decoder rows, so the forward and both gradients cost
    O(B k d_in) instead of the dense O(B d_sae d_in) matmul, and no dense gradient is formed.
    """
    return torch.nn.functional.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


def auxk_loss(sae: SAE, pre: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Reconstruct the residual from the top-k_aux dead latents; zero when none are dead."""
    dead = ctx.dead_mask
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(sae.cfg.effective_k_aux, n_dead)
    top, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)  # k_aux <= n_dead: all finite
    residual = (x - x_hat).detach()
    scale = min(n_dead / sae.cfg.effective_k_aux, 1.0)  # few dead latents: a proportionally smaller term
    return sae.cfg.aux_coefficient * scale * mse_per_token(sparse_decode(idx, torch.relu(top), sae.W_dec), residual)


@register
class TopKSAE(SAE):
    architecture = "topk"
    Config = TopKConfig
    sweep_parameter = "k"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return scatter_topk(pre, self.cfg.k)

    def saved_config_extras(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}  # SAELens' TopK keys

    @classmethod
    def config_from_saved(cls, saved_cfg: dict, values: dict) -> dict:
        return {"k": int(saved_cfg.get("k", values.get("k", 100)))}  # 100 is SAELens' default

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.pre_acts(x)
        top, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        vals = torch.relu(top)
        x_hat = sparse_decode(idx, vals, self.W_dec) + self.b_dec
        f = torch.zeros_like(pre).scatter_(-1, idx, vals.detach())  # for statistics only: no gradient
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, x), "auxk": auxk_loss(self, pre, x, x_hat, ctx)})


class BatchTopKConfig(TopKConfig):
    architecture: str = "batchtopk"
    threshold_momentum: float = Field(
        0.99, ge=0.0, lt=1.0, description="EMA momentum of the inference threshold (min kept activation per batch)."
    )


@register
class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    Config = BatchTopKConfig
    sweep_parameter = "k"

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # Global inference threshold; negative means "not yet estimated" (inference is then plain ReLU).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        flat = acts.reshape(-1)
        n_keep = min(self.cfg.k * acts.shape[0], flat.numel())
        top, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, top).reshape(acts.shape)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.batch_topk(pre)
        return pre * (pre > self.threshold.clamp_min(0)).to(pre.dtype)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.pre_acts(x)
        f = self.batch_topk(pre)
        x_hat = self.decode(f)
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, x), "auxk": auxk_loss(self, pre, x, x_hat, ctx)})

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        super().after_optimizer_step(out)
        kept = out.feature_acts[out.feature_acts > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)

    def saved_architecture(self) -> str:
        return "jumprelu"

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        theta = state.pop("threshold").clamp_min(0)
        state["threshold"] = theta.expand(self.cfg.d_sae).clone()
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
