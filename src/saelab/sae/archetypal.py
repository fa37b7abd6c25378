"""Archetypal SAEs, A-SAE and RA-SAE (Fel, Lubana, Prince et al. 2025, arXiv 2502.12892).

The dictionary is tied to the data: D = exp(s) * (A C + Lambda), where C [n_candidates, d_in] are
fixed candidate points (k-means centroids of the centred training activations, computed in
`init_from_data`), A [d_sae, n_candidates] is row-stochastic (each atom is a convex combination
of candidates), and Lambda is a relaxation with ||Lambda_i|| <= delta (delta = 0: A-SAE, strictly
inside the data's convex hull; delta > 0: RA-SAE). A and Lambda are projected back onto their
constraint sets after every optimizer step (A onto the simplex, Lambda onto the delta-ball).
Anchoring atoms to data points is what makes dictionaries stable across seeds. The encoder is
TopK's (any encoder works; TopK is the paper's main one). Saved under its own name with A, C,
Lambda and the scale, since SAELens has no such parametrisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from saelab.sae.base import StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.topk import TopKConfig, TopKSAE, auxk_loss


class ArchetypalConfig(TopKConfig):
    architecture: str = "archetypal"
    resample_dead: Literal[False] = Field(False, description="Not available here (no resampling).")
    n_candidates: PositiveInt | None = Field(None, description="k-means candidate points (default 2 * d_sae).")
    relaxation: NonNegativeFloat = Field(
        0.0, description="delta: max norm of each atom's offset from the hull (0: A-SAE)."
    )
    learn_scale: bool = Field(True, description="Learn one positive scale exp(s) on the dictionary.")
    kmeans_iter: PositiveInt = Field(50, description="k-means iterations when choosing candidates.")
    decoder_norm: Literal["archetypal"] = Field(
        "archetypal",
        description="Decoder rows are convex combinations of data candidates (plus a bounded relaxation), "
        "so neither 'unit' rows nor a norm 'penalty' applies.",
    )

    @property
    def effective_n_candidates(self) -> int:
        return self.n_candidates if self.n_candidates is not None else 2 * self.d_sae


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; empty clusters keep their previous centroid."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(probs, 1, generator=gen))
        centres.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        new = c.clone()
        new[filled] = sums[filled] / counts[filled, None]
        if torch.allclose(new, c):
            break
        c = new
    return c


def project_to_simplex(a: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008).
    Unlike relu-then-normalise, it never leaves a row all zero after a large step."""
    u = a.sort(dim=1, descending=True).values
    css = u.cumsum(1) - 1
    ks = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=a.dtype)
    rho = ((u - css / ks) > 0).to(a.dtype).mul(ks).argmax(1, keepdim=True)
    tau = css.gather(1, rho) / (rho + 1).to(a.dtype)
    return torch.relu(a - tau)


@register
class ArchetypalSAE(TopKSAE):
    architecture = "archetypal"
    Config = ArchetypalConfig
    sweep_parameter = "k"
    sweep_kind = "count"

    def __init__(self, cfg: ArchetypalConfig):
        super().__init__(cfg)
        n_c = cfg.effective_n_candidates
        w_dec = self.W_dec.detach().clone()
        del self.W_dec  # the decoder is derived from A, C, Lambda and the scale
        # Until data arrives, the candidates are the random unit atoms themselves (repeated).
        self.register_buffer("candidates", w_dec[torch.arange(n_c) % cfg.d_sae].clone())
        self.register_buffer("relaxation_bound", torch.tensor(float(cfg.relaxation)))
        a = torch.zeros(cfg.d_sae, n_c)
        a[torch.arange(cfg.d_sae), torch.arange(cfg.d_sae) % n_c] = 1.0  # atom i starts at candidate i
        self.A = torch.nn.Parameter(a)
        self.Lambda = torch.nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.log_scale = torch.nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_scale)

    @property
    def W_dec(self) -> torch.Tensor:
        return self.log_scale.exp() * (self.A @ self.candidates + self.Lambda)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.pre_acts(x)
        f = self.activation(pre)
        W_dec = self.W_dec
        x_hat = f @ W_dec + self.b_dec
        aux = auxk_loss(self, pre, x, x_hat, ctx)
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, ctx.target_for(x)), "auxk": aux})

    @torch.no_grad()
    def init_from_data(self, sample) -> None:
        """Candidates = k-means centroids of x - b_dec; encoder rows start at their atoms (normalised)."""
        x = (sample.x - self.b_dec).to(self.candidates.dtype)
        n_c = self.cfg.effective_n_candidates
        gen = torch.Generator().manual_seed(self.cfg.seed)
        if x.shape[0] < n_c:  # too few points: sample with replacement plus small jitter
            x = x[torch.randint(x.shape[0], (n_c,), generator=gen)] + 1e-3 * torch.randn(n_c, x.shape[1], generator=gen)
        self.candidates.copy_(kmeans(x, n_c, self.cfg.kmeans_iter, gen))
        # Each atom picks a distinct random candidate, so seeds differ only through this choice and training.
        perm = (
            torch.randperm(n_c, generator=gen)[: self.cfg.d_sae]
            if n_c >= self.cfg.d_sae
            else torch.arange(self.cfg.d_sae) % n_c
        )
        self.A.zero_()
        self.A[torch.arange(self.cfg.d_sae), perm] = 1.0
        atoms = self.candidates[perm]
        norms = atoms.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.log_scale.zero_()
        self.W_enc.copy_((atoms / norms.pow(2)).t())  # f_i ~ projection coefficient onto atom i

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        self.A.copy_(project_to_simplex(self.A))
        norms = self.Lambda.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.Lambda.mul_(torch.clamp(self.relaxation_bound / norms, max=1.0))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.W_enc *= scale
        self.b_dec /= scale
        self.candidates /= scale
        self.Lambda /= scale
        self.relaxation_bound /= scale


class RelaxedArchetypalConfig(ArchetypalConfig):
    architecture: str = "relaxed_archetypal"
    relaxation: NonNegativeFloat = Field(
        1.0,
        description="delta: max norm of each atom's offset from the hull (inputs are scaled to E||x|| = sqrt(d_in)).",
    )


@register
class RelaxedArchetypalSAE(ArchetypalSAE):
    """RA-SAE: atoms may leave the convex hull by at most delta, which recovers standard reconstruction."""

    architecture = "relaxed_archetypal"
    Config = RelaxedArchetypalConfig
