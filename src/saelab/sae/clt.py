"""Cross-layer transcoders (CLT): layer l's latents read layer l's MLP input and write the MLP
outputs of layer l and of every later layer.

With L layers, per-layer input width d, per-layer output width e and F latents per layer:

    f_l        = sigma(W_enc[l]^T (x_l - b_in_l) + b_enc_l)                     [F] per layer
    y_hat_{l'} = b_dec_{l'} + sum_{l <= l'} f_l W_dec_l[:, l' - l, :]            [e] per layer

The config names the L input sites (`site: [in_0, ..., in_{L-1}]`) and the L output sites
(`write_site: [out_0, ..., out_{L-1}]`), in layer order; the dictionary reads their concatenation
and writes theirs, so the trainer's per-site scales and the evaluation's per-site FVU work as for
any transcoder, and `saelab.save` writes saelab's dictionary layout (its tensors by name; the
SAELens layout cannot hold several sites). `d_in` = L*d and `d_out` = L*e are totals, and so is
`d_sae` = L*F: latent `l*F + i` is latent i of layer l (so dead-latent statistics, sparsity files
and metrics see one latent axis).

Storage follows the structure instead of a dense [L*d, L*F] encoder and [L*F, L*e] decoder:
`W_enc [L, d, F]` (block-diagonal: each layer's latents see only their layer's input; one batched
matmul) and, per source layer l, `W_dec_l [F, L - l, e]` (its latents' decoders into layers l..L-1),
F*e*L(L+1)/2 numbers in all. `b_enc [L*F]`, `b_in [L*d]` and `b_dec [L*e]` are flat, like the
concatenated sites. `W_dec` is a dense [L*F, L*e] view assembled on demand (zeros where a latent
cannot write) for analysis tools that read decoder rows; training and inference never build it.

Decoder rows are free (no unit norm): a latent's decoder norm is the norm of its concatenated
decoder over all the layers it writes, `decoder_norms()` (measured, as for crosscoders, in the
space it was trained in: `site_norm_scale` keeps each output site's folded scale), and both the
TopK selection scores and the JumpReLU penalties weigh latents by it. Two architectures:
- `clt_topk`: `k` active latents per token over all layers together, chosen per layer (k/L each),
  per token (top k of the concatenation) or per batch (BatchTopK over the concatenation, the
  default; it trains best; at inference a latent fires when its score passes one global threshold
  learnt during training). AuxK on the target's residual.
- `clt_jumprelu`: learnt per-latent thresholds through the straight-through estimator of
  `saelab.sae.jumprelu`, with an L0 penalty or a tanh penalty on activation x decoder norm, and
  optionally a pre-activation penalty that pulls latents below threshold back up.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from saelab.errors import ConfigError
from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.jumprelu import jumprelu, step
from saelab.sae.registry import register
from saelab.sae.topk import track_threshold


class CLTConfig(SAEConfig):
    """A cross-layer transcoder: the sites of L layers, in layer order, and total widths."""

    d_in: PositiveInt = Field(description="Width of all input sites together: L x the per-layer input width.")
    d_sae: PositiveInt = Field(
        description="Latents of all layers together: L x the latents per layer (latent l*F + i is latent i of layer l)."
    )
    d_out: PositiveInt | None = Field(
        None, description="Width of all output sites together: L x the per-layer output width (None: d_in)."
    )
    site: list[str] = Field(
        description="The L sites read, one per layer in layer order (each MLP's input); layer l's latents "
        "read only site l."
    )
    write_site: list[str] = Field(
        description="The L sites written, one per layer in the same order (each MLP's output); layer l's "
        "latents write sites l..L-1."
    )

    @model_validator(mode="after")
    def _check_sites(self):  # replaces SAEConfig's check of the same name
        reads, writes = self.site, self.write_site
        if not reads:
            raise ValueError("site lists no sites; a cross-layer transcoder reads one site per layer")
        if len(reads) != len(writes):
            raise ValueError(
                f"site lists {len(reads)} input sites but write_site {len(writes)} output sites; a cross-layer "
                "transcoder reads one site and writes one site per layer"
            )
        for key, names in (("site", reads), ("write_site", writes)):
            if len(set(names)) != len(names):
                raise ValueError(f"{key} lists a site twice ({names}); name each site once")
        both = sorted(set(reads) & set(writes))
        if both:
            raise ValueError(f"{both} are both read and written; a transcoder reads MLP inputs and writes MLP outputs")
        n = len(reads)
        for key, value in (("d_in", self.d_in), ("d_out", self.output_width), ("d_sae", self.d_sae)):
            if value % n:
                what = "latents" if key == "d_sae" else "sites"
                raise ValueError(
                    f"{key}={value} is not divisible by the {n} layers; every layer's {what} have equal widths "
                    f"and {key} is their sum"
                )
        if self.skip:
            raise ValueError("skip is not supported by cross-layer transcoders; drop it")
        if self.decoder_norm != "penalty":
            raise ValueError("decoder_norm must be 'penalty' for a cross-layer transcoder (its decoder rows are free)")
        return self

    @property
    def read_sites(self) -> list[str]:
        return list(self.site)

    @property
    def write_sites(self) -> list[str]:
        return list(self.write_site)

    @property
    def is_transcoder(self) -> bool:
        return True

    @property
    def n_layers(self) -> int:
        return len(self.site)

    @property
    def layer_d_in(self) -> int:
        return self.d_in // self.n_layers

    @property
    def layer_d_out(self) -> int:
        return self.output_width // self.n_layers

    @property
    def layer_d_sae(self) -> int:
        return self.d_sae // self.n_layers


class CrossLayerTranscoder(SAE):
    """Storage, encoder, decoder, norms, scale folding and checks shared by the CLT architectures."""

    Config = CLTConfig
    transcodes = False  # not a one-site transcoder nor a crosscoder: its own kind, always both
    crosscodes = False
    needs_sites = True

    def __init__(self, cfg: CLTConfig):
        torch.nn.Module.__init__(self)  # SAE.__init__ would build dense 2-D weights
        self._check_capable(cfg)
        self.cfg = cfg
        L, d, e, F = cfg.n_layers, cfg.layer_d_in, cfg.layer_d_out, cfg.layer_d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        # Encoder columns of unit norm within their layer's input: inputs are scaled to norm sqrt(d)
        # per site, so pre-activations start at about unit size. Each latent's concatenated decoder
        # (over the L - l layers it writes) starts at unit norm.
        w_enc = torch.empty(L, d, F).uniform_(-1, 1, generator=gen)
        self.W_enc = torch.nn.Parameter(w_enc / w_enc.norm(dim=1, keepdim=True))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_in = torch.nn.Parameter(torch.zeros(cfg.d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.output_width))
        for layer in range(L):
            w = torch.empty(F, L - layer, e).uniform_(-1, 1, generator=gen)
            setattr(self, f"W_dec_{layer}", torch.nn.Parameter(w / w.flatten(1).norm(dim=1)[:, None, None]))
        # What each output site was multiplied by in training (1 until `fold_scales`), as for
        # crosscoders: decoder norms are measured in that space, so folding per-site scales changes
        # neither which latents are selected nor the norms reported.
        self.register_buffer("site_norm_scale", torch.ones(L))

    @classmethod
    def _check_capable(cls, cfg: SAEConfig) -> None:
        if not isinstance(cfg, CLTConfig):
            raise ConfigError(f"architecture '{cls.architecture}' needs a cross-layer transcoder config")

    def extra_repr(self) -> str:
        c = self.cfg
        knob = f", {self.sweep_parameter}={getattr(c, self.sweep_parameter)}" if self.sweep_parameter else ""
        return f"layers={c.n_layers}, d_in={c.layer_d_in}, d_out={c.layer_d_out}, latents/layer={c.layer_d_sae}{knob}"

    @property
    def decoders(self) -> list[torch.Tensor]:
        """`W_dec_l [F, L - l, e]` for each source layer l."""
        return [getattr(self, f"W_dec_{layer}") for layer in range(self.cfg.n_layers)]

    @property
    def W_dec(self) -> torch.Tensor:
        """The dense [d_sae, d_out] decoder (zeros where a latent cannot write), assembled on demand
        for tools that read decoder rows; F*e*L^2 numbers, so meant for analysis, not training."""
        e = self.cfg.layer_d_out
        return torch.cat(
            [torch.nn.functional.pad(W.flatten(1), (layer * e, 0)) for layer, W in enumerate(self.decoders)]
        )

    # ------------------------------------------------------------------ inference
    @property
    def input_b_dec(self) -> torch.Tensor:
        return self.b_in

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae]: each layer's input through its own encoder block (one batched matmul)."""
        c = self.cfg
        lead = x.shape[:-1]
        xs = (x.reshape(-1, c.d_in) - self.b_in).reshape(-1, c.n_layers, c.layer_d_in).transpose(0, 1)
        pre = torch.bmm(xs, self.W_enc).transpose(0, 1).reshape(*lead, c.d_sae)  # [L, B, F] -> [..., L*F]
        return pre + self.b_enc

    def training_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x)

    def release_training_buffers(self) -> None:
        pass

    def selection_scores(self, pre: torch.Tensor) -> torch.Tensor:
        """A latent's contribution to the output: pre-activation x concatenated decoder norm."""
        return pre * self.decoder_norms().detach()

    def decode_without_bias(self, f: torch.Tensor) -> torch.Tensor:
        """sum over source layers l of f_l W_dec_l, written into the output layers l..L-1."""
        c = self.cfg
        lead = f.shape[:-1]
        f = f.reshape(-1, c.n_layers, c.layer_d_sae)
        out = f.new_zeros(f.shape[0], c.output_width)
        for layer, W in enumerate(self.decoders):
            out[:, layer * c.layer_d_out :] += f[:, layer] @ W.flatten(1)
        return out.reshape(*lead, c.output_width)

    def decode(self, f: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode_without_bias(f) + self.b_dec

    # ------------------------------------------------------------------ norms
    def decoder_norms(self) -> torch.Tensor:
        """[d_sae] norm of each latent's concatenated decoder over every layer it writes (in the
        training space, see `site_norm_scale`)."""
        return self.site_decoder_norms().norm(dim=1)

    def site_decoder_norms(self) -> torch.Tensor:
        """[d_sae, L] norm of each latent's decoder into each output layer (0 before its own layer),
        in the space it was trained in (each site at mean norm sqrt(d))."""
        scale = self.site_norm_scale
        return torch.cat(
            [torch.nn.functional.pad(W.norm(dim=2) * scale[i:], (i, 0)) for i, W in enumerate(self.decoders)]
        )

    # ------------------------------------------------------------------ training
    def check_sites(self, batch: Any) -> None:
        """Every site the CLT reads or writes has its layer's width (their sum alone, which the
        trainer checks, would let a 5 + 7 pair pass as 6 + 6)."""
        sites = getattr(batch, "sites", None)
        if not sites:
            return
        c = self.cfg
        for names, width, key in ((c.site, c.layer_d_in, "d_in"), (c.write_site, c.layer_d_out, "d_out")):
            for name in names:
                t = sites.get(name)
                if t is not None and t.shape[-1] != width:
                    widths = {n: sites[n].shape[-1] for n in names if n in sites}
                    raise ConfigError(
                        f"site '{name}' has width {t.shape[-1]} but this cross-layer transcoder expects {width} "
                        f"per layer ({key}/{c.n_layers}); the sites' widths: {widths}. Every layer's sites need "
                        "equal widths"
                    )

    def train_forward(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        self.check_sites(ctx.batch)
        return self.loss_terms(x, ctx)

    # ------------------------------------------------------------------ saving
    @torch.no_grad()
    def fold_scales(self, input_scale: float | torch.Tensor, target_scale: float | torch.Tensor) -> None:
        """Take raw activations when trained on `x * input_scale` to reproduce `target * target_scale`
        (numbers, or one entry per column): W_enc[l] rows times s_l, b_in / s; every decoder block
        into layer l' and b_dec divided by t_{l'}. Pre-activations are unchanged."""
        c = self.cfg
        s = torch.as_tensor(input_scale, dtype=self.W_enc.dtype, device=self.W_enc.device)
        t = torch.as_tensor(target_scale, dtype=self.b_dec.dtype, device=self.b_dec.device)
        self.W_enc.mul_(s.reshape(c.n_layers, c.layer_d_in, 1) if s.dim() else s)
        self.b_in.div_(s)
        per_layer = t.reshape(c.n_layers, c.layer_d_out) if t.dim() else None
        for layer, W in enumerate(self.decoders):
            W.div_(per_layer[layer:] if per_layer is not None else t)
        self.b_dec.div_(t)
        self.site_norm_scale.mul_(per_layer[:, 0] if per_layer is not None else t)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.fold_scales(scale, scale)


# ---------------------------------------------------------------------------- TopK
class CLTTopKConfig(CLTConfig):
    architecture: str = "clt_topk"
    k: PositiveInt = Field(8, description="Active latents per token, all layers together (the L0).")
    select: Literal["batch", "token", "layer"] = Field(
        "batch",
        description="How the k are chosen, by pre-activation x decoder norm: 'batch' (the top B*k of the whole "
        "batch over every layer's latents, BatchTopK; a global threshold at inference), 'token' (the top k of "
        "each token over every layer) or 'layer' (the top k/L of each layer, for each token).",
    )
    k_aux: PositiveInt | None = Field(None, description="Dead latents used by AuxK (default d_out // 2, at most 512).")
    aux_coefficient: NonNegativeFloat = Field(1 / 32, description="alpha on the AuxK loss.")
    threshold_momentum: float = Field(
        0.99, ge=0.0, lt=1.0, description="select='batch': EMA momentum of the inference threshold."
    )

    @model_validator(mode="after")
    def _k_fits(self):
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}; choose k <= d_sae")
        if self.select == "layer" and self.k % self.n_layers:
            raise ValueError(
                f"select='layer' takes k/L latents from each layer, but k={self.k} is not divisible by the "
                f"{self.n_layers} layers"
            )
        return self

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(512, self.output_width // 2))


@register
class CLTTopK(CrossLayerTranscoder):
    architecture = "clt_topk"
    Config = CLTTopKConfig
    sweep_parameter = "k"
    sweep_kind = "count"

    def __init__(self, cfg: CLTTopKConfig):
        super().__init__(cfg)
        if cfg.select == "batch":
            # The inference threshold on pre-activation x (training-space) decoder norm: an EMA of the
            # smallest kept score; negative until estimated (inference is then ReLU).
            self.register_buffer("threshold", torch.tensor(-1.0))

    @torch.no_grad()
    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """[B, d_sae] bool: the latents kept (see `select` in the config)."""
        c = self.cfg
        scores = self.selection_scores(pre.detach())
        keep = torch.zeros_like(scores, dtype=torch.bool)
        if c.select == "batch":
            flat = keep.view(-1)
            flat[scores.reshape(-1).topk(min(c.k * scores.shape[0], flat.numel()), sorted=False).indices] = True
        elif c.select == "token":
            keep.scatter_(-1, scores.topk(c.k, dim=-1, sorted=False).indices, True)
        else:
            per_layer = scores.reshape(-1, c.n_layers, c.layer_d_sae)
            idx = per_layer.topk(c.k // c.n_layers, dim=-1, sorted=False).indices
            keep.view(-1, c.n_layers, c.layer_d_sae).scatter_(-1, idx, True)
        return keep

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.select == "batch" and not self.training:
            return pre * (self.selection_scores(pre) > self.threshold.clamp_min(0)).to(pre.dtype)
        shape = pre.shape
        pre = pre.reshape(-1, shape[-1])
        return (torch.relu(pre) * self.select(pre)).reshape(shape)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.pre_acts(x)
        f = torch.relu(pre) * self.select(pre)
        y_hat = self.decode(f)
        target = ctx.target_for(x)
        return TrainOutput(
            y_hat, f.detach(), {"mse": mse_per_token(y_hat, target), "auxk": self.auxk_loss(pre, y_hat, target, ctx)}
        )

    def auxk_loss(self, pre: torch.Tensor, y_hat: torch.Tensor, target: torch.Tensor, ctx: StepContext):
        """The top k_aux dead latents (by score) of each token reconstruct what the live ones left of
        the target; zero when none are dead."""
        dead = ctx.dead_mask
        n_dead = int(dead.sum()) if dead is not None else 0
        if n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(self.cfg.effective_k_aux, n_dead)
        scores = self.selection_scores(pre.detach()).masked_fill(~dead.to(pre.device), -torch.inf)
        idx = scores.topk(k_aux, dim=-1, sorted=False).indices
        f_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
        residual = (target - y_hat).detach()
        scale = min(n_dead / self.cfg.effective_k_aux, 1.0)
        return self.cfg.aux_coefficient * scale * mse_per_token(self.decode_without_bias(f_aux), residual)

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        if self.cfg.select != "batch":
            return
        track_threshold(self.threshold, out.feature_acts * self.decoder_norms(), self.cfg.threshold_momentum)


# ---------------------------------------------------------------------------- JumpReLU
class CLTJumpReLUConfig(CLTConfig):
    architecture: str = "clt_jumprelu"
    sparsity_coefficient: NonNegativeFloat = Field(1.0, description="lambda on the sparsity penalty.")
    penalty: Literal["tanh", "l0"] = Field(
        "tanh",
        description="'tanh': sum_i tanh(c * f_i * |d_i|), |d_i| the norm of latent i's decoder over every layer "
        "it writes; 'l0': the number of active latents (already blind to how a latent's size is split "
        "between code and decoder).",
    )
    tanh_scale: PositiveFloat = Field(1.0, description="c in the tanh penalty.")
    preact_coefficient: NonNegativeFloat = Field(
        0.0,
        description="lambda_p on sum_i relu(theta_i - pre_i) * |d_i|, which pulls latents below their "
        "threshold back up (0: off).",
    )
    bandwidth: PositiveFloat = Field(0.05, description="Width of the rectangle kernel in the threshold's gradient.")
    init_threshold: PositiveFloat = Field(1.0, description="Initial threshold of every latent.")


@register
class CLTJumpReLU(CrossLayerTranscoder):
    architecture = "clt_jumprelu"
    Config = CLTJumpReLUConfig
    sweep_parameter = "sparsity_coefficient"
    sweep_kind = "coefficient"

    def __init__(self, cfg: CLTJumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jumprelu(pre, self.threshold, self.cfg.bandwidth)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        c = self.cfg
        pre = self.pre_acts(x)
        theta = self.threshold
        f = jumprelu(pre, theta, c.bandwidth)
        y_hat = self.decode(f)
        norms = self.decoder_norms()
        if c.penalty == "tanh":
            sparsity = torch.tanh(c.tanh_scale * f * norms).sum(-1).mean()
        else:
            sparsity = step(pre, theta, c.bandwidth).sum(-1).mean()
        losses = {
            "mse": mse_per_token(y_hat, ctx.target_for(x)),
            c.penalty: c.sparsity_coefficient * ctx.sparsity_scale * sparsity,
        }
        if c.preact_coefficient > 0:
            losses["preact"] = c.preact_coefficient * (torch.relu(theta - pre) * norms).sum(-1).mean()
        return TrainOutput(y_hat, f.detach(), losses)
