"""End-to-end dictionaries (e2e and e2e+ds): trained through the frozen model, not on reconstruction.

The SAE's output replaces the activation at its hookpoint, the rest of the (frozen) model runs on
it, and the loss is

    kl_coefficient * KL(p_clean || p_spliced)                              ("kl_clean_spliced")
  + the SAE's own sparsity / auxiliary terms (its local "mse" is dropped)   ("l1", "l0", "auxk", ...)
  + downstream_coefficient * mean_k FVU_k   (e2e+ds only)                   ("downstream_fvu")

where KL(p_clean || p_spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)), averaged
over every attended position's next-token distribution (`kl_clean_to_spliced`), and FVU_k is the fraction of the
clean activation's variance at downstream hookpoint k that the spliced forward leaves unexplained,
sum ||a_k^sae - a_k^clean||^2 / sum ||a_k^clean - mean(a_k^clean)||^2 over the spliced positions of
the batch (scale-free, so one coefficient suits every layer; 1 - FVU_k is the report's downstream
explained variance). TopK's AuxK term stays: it only revives dead latents (set aux_coefficient 0 to
drop it).

How it fits the one loop: `E2ESource` yields ordinary batches whose `x` is the hookpoint's
activations at the spliced positions (real tokens, not BOS/pad/specials), computed with the clean
forward under no_grad, with `context` holding the token rows, masks and the clean next-token
log-probabilities (that one clean forward per batch is all the clean work). The `Trainer` scales x
as for any SAE (train.normalize_activations: E||x|| = sqrt(d_in) by default, folded into the weights at
the end, so the saved SAE takes raw activations like every other) and calls `E2EObjective` instead
of `sae.train_forward`; the objective undoes the scale on the SAE's output before splicing it (the
model always sees raw-unit activations). Checkpoints, resume, logging and statistics are the
trainer's: the source's position is its text position.

Gradients: the spliced forward starts under no_grad (the layers before the hookpoint build no graph)
and grad mode is switched on in the hook that writes the SAE's output, so only the layers after
it are differentiated. The model's parameters are frozen (requires_grad False, eval mode) while
an objective holds them (`release` restores the flags): they never change and never get a .grad.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat

from saelab.activations.base import Batch
from saelab.config import StrictModel
from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids

KL_TERM = "kl_clean_spliced"  # KL(p_clean || p_spliced), the loss term's name in logs and TrainOutput.losses
DOWNSTREAM_TERM = "downstream_fvu"


class E2EConfig(StrictModel):
    """An end-to-end objective (`train.objective`); `downstream` non-empty makes it e2e+ds."""

    downstream: list[str] = Field(
        default_factory=list,
        description="Hookpoints after the SAE's whose clean activations the spliced forward must keep "
        "(e2e+ds); empty: pure e2e.",
    )
    kl_coefficient: PositiveFloat = Field(1.0, description="Weight of KL(p_clean || p_spliced), nats per position.")
    downstream_coefficient: NonNegativeFloat = Field(
        1.0, description="Weight of the mean downstream FVU (e2e+ds only; 0 logs it without training on it)."
    )


@dataclass
class E2ERows:
    """The token rows behind one batch's x, and what the clean forward gave for them."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    keep: torch.Tensor  # [R, T] bool: the spliced positions, x's rows in row-major order
    score: torch.Tensor  # [R, T] bool: positions whose next-token distribution is scored (attended)
    clean_logp: torch.Tensor  # [n_score, vocab] clean log-probabilities at the scored positions
    clean_sites: dict[str, torch.Tensor]  # downstream hookpoint -> clean activations at `keep` [N, d]


def kl_clean_to_spliced(clean_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_clean || p_spliced) = sum_v p_clean (log p_clean - log p_spliced), in nats.

    `clean_logp` [n, V] are clean log-probabilities, `logits` [n, V] the spliced model's logits."""
    logq = torch.log_softmax(logits.float(), -1)
    return (clean_logp.exp() * (clean_logp - logq)).sum(-1).mean()


def firing_order(model: torch.nn.Module, names: list[hooks.Hookpoint], device) -> list[str]:
    """The order in which the hookpoints run in one forward (to check downstream is downstream)."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = []
    for hp in names:

        def note(*_, name=hp.name):
            if name not in order:
                order.append(name)

        mod = modules[hp.module]
        handles.append(mod.register_forward_pre_hook(note) if hp.io == "input" else mod.register_forward_hook(note))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.int64, device=device))
    finally:
        for h in handles:
            h.remove()
    return order


def resolve_sites(model: torch.nn.Module, hookpoint: str, downstream: list[str]) -> tuple[hooks.Hookpoint, list]:
    """The SAE's hookpoint and the downstream ones, each a single module that runs after it."""
    hp = hooks.resolve(model, hookpoint)
    if len(hp) != 1:
        raise ConfigError(f"hookpoint '{hookpoint}' matches {len(hp)} modules; an e2e SAE splices into one")
    hp = hp[0]
    ds = hooks.resolve(model, list(downstream)) if downstream else []
    if hp in ds:
        raise ConfigError(f"train.objective.downstream lists the SAE's own hookpoint {hp}; name later hookpoints")
    order = firing_order(model, [hp, *ds], next(model.parameters()).device)
    for d in ds:
        if d.name not in order:
            raise ConfigError(f"train.objective.downstream: hookpoint {d} never runs in the model's forward")
        if order.index(d.name) < order.index(hp.name):
            raise ConfigError(
                f"train.objective.downstream: hookpoint {d} runs before the SAE's hookpoint {hp}; a downstream "
                "hookpoint must come after it (the SAE cannot change what runs before it)"
            )
    return hp, ds


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kwargs = {"use_cache": False} if hooks._accepts_use_cache(model) else {}
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits


class E2ESource:
    """Batches of whole token rows for end-to-end training, as an activation source.

    Each batch is `rows_per_batch` rows of `context_size` tokens (in text order: whole sequences,
    since the model needs their context). One clean forward per batch, under no_grad, gives `x`
    (the hookpoint's activations at the spliced positions), `sites` (the hookpoint and every
    downstream hookpoint there) and `context` (an `E2ERows`). The position is the text position
    (`TokenRows`), so a checkpoint resumes exactly; with `repeat` the text restarts when used up.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        data: Any,
        hookpoint: str,
        downstream: list[str] = (),
        *,
        context_size: int = 128,
        rows_per_batch: int = 8,
        column: str = "text",
        packing: bool = True,
        prepend_bos: bool = True,
        exclude_special: bool = True,
        repeat: bool = True,
    ):
        if rows_per_batch <= 0:
            raise ConfigError(f"rows_per_batch must be positive (got {rows_per_batch})")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.hookpoint, self.downstream = resolve_sites(model, hookpoint, list(downstream))
        self.rows = TokenRows(load_texts(data, column), tokenizer, context_size, packing, prepend_bos)
        self.specials = special_ids(tokenizer) if exclude_special else None
        self.rows_per_batch = rows_per_batch
        self.repeat = repeat
        self.position = 0
        probe = hooks.run(
            model, torch.zeros((1, 2), dtype=torch.int64, device=self.device), [self.hookpoint, *self.downstream]
        )
        self.site_widths = {name: int(t.shape[-1]) for name, t in probe.items()}
        self.d_in = self.site_widths[self.hookpoint.name]

    def __iter__(self) -> E2ESource:
        return self

    def _next_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.rows.next_rows(self.rows_per_batch)
        if got is None and self.repeat:
            self.rows.restart()
            got = self.rows.next_rows(self.rows_per_batch)
        if got is None:
            raise StopIteration
        return got

    @torch.no_grad()
    def __next__(self) -> Batch:
        ids, mask = (t.to(self.device) for t in self._next_rows())
        keep = keep_mask(ids, mask, self.specials)
        if not keep.any():
            raise ConfigError("a batch of rows has no position to splice (all padding or special tokens)")
        sites = [self.hookpoint, *self.downstream]
        with hooks.capture(self.model, sites, stop_early=False) as store:
            logits = _forward(self.model, ids, mask)
        score = mask.bool()
        acts = {hp.name: store[hp.name][keep].float() for hp in sites}
        context = E2ERows(
            input_ids=ids,
            attention_mask=mask,
            keep=keep,
            score=score,
            clean_logp=torch.log_softmax(logits.float(), -1)[score],
            clean_sites={hp.name: acts[hp.name] for hp in self.downstream},
        )
        self.position += 1
        return Batch(x=acts[self.hookpoint.name], tokens=ids[keep], sites=acts, context=context)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"rows.{k}": v for k, v in self.rows.state_dict().items()}
        state["position"] = torch.tensor(self.position, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rows.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rows.")})
        self.position = int(state["position"])


@contextlib.contextmanager
def spliced(
    model: torch.nn.Module,
    hp: hooks.Hookpoint,
    keep: torch.Tensor,
    value: torch.Tensor,
    downstream: list[hooks.Hookpoint] = (),
    grad: bool = True,
):
    """Inside the block, a forward of `model` writes `value` [N, d] at `hp`'s `keep` positions and
    fills the yielded dict with the downstream activations, with their graph. The forward runs
    under no_grad up to `hp`; with `grad` the hook that writes `value` turns grad mode on, so only
    what runs after it is differentiated (without, nothing is). Grad mode is restored on exit."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}

    def write(act: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(grad)  # from here on the forward builds a graph (restored on exit)
        new = act.clone()
        new[keep] = value.to(act.dtype)
        return new

    def splice_out(mod, args, out):
        return hooks.replace_first(out, write(hooks.first_tensor(out)))

    def splice_in(mod, args):
        return hooks.replace_first(args, write(hooks.first_tensor(args)))

    def reader(name: str, io: str):
        if io == "input":
            return lambda mod, args: store.__setitem__(name, hooks.first_tensor(args))
        return lambda mod, args, out: store.__setitem__(name, hooks.first_tensor(out))

    handles = []
    prev = torch.is_grad_enabled()
    try:
        mod = modules[hp.module]
        handles.append(
            mod.register_forward_pre_hook(splice_in) if hp.io == "input" else mod.register_forward_hook(splice_out)
        )
        for d in downstream:
            m = modules[d.module]
            fn = reader(d.name, d.io)
            handles.append(m.register_forward_pre_hook(fn) if d.io == "input" else m.register_forward_hook(fn))
        torch.set_grad_enabled(False)
        yield store
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(prev)


def fvu_rows(pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """sum ||pred - clean||^2 / sum ||clean - mean(clean)||^2 over the rows (a differentiable FVU)."""
    total = (clean - clean.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (pred.float() - clean).pow(2).sum() / total


class E2EObjective:
    """What a `Member` calls instead of `sae.train_forward` in an end-to-end run (see the module
    docstring for the loss). Holds the frozen model; `release()` gives its flags back."""

    def __init__(self, model: torch.nn.Module, hookpoint: str, cfg: E2EConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, E2EConfig) else E2EConfig.parse(cfg or {})
        self.model = model
        self.hookpoint, self.downstream = resolve_sites(model, hookpoint, self.cfg.downstream)
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._was_training = model.training
        model.requires_grad_(False)
        model.eval()

    def release(self) -> None:
        """Give the model back its requires_grad flags and train/eval mode."""
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._was_training)

    def __call__(self, sae, x: torch.Tensor, ctx) -> Any:
        rows: E2ERows | None = getattr(ctx.batch, "context", None)
        if not isinstance(rows, E2ERows):
            raise ConfigError("end-to-end training needs batches from an E2ESource (token rows with clean outputs)")
        if sae.cfg.is_transcoder or sae.cfg.n_sites > 1:
            raise ConfigError(
                "end-to-end training splices an SAE's output back where it reads; a transcoder or crosscoder "
                "writes other sites (train it locally)"
            )
        out = sae.train_forward(x, ctx)
        sae.release_training_buffers()  # batch sizes vary with the rows' special tokens
        raw = out.x_hat / ctx.input_factor  # the model reads raw-unit activations
        with spliced(self.model, self.hookpoint, rows.keep, raw, self.downstream) as store:
            logits = _forward(self.model, rows.input_ids, rows.attention_mask)
        losses = {KL_TERM: self.cfg.kl_coefficient * kl_clean_to_spliced(rows.clean_logp, logits[rows.score])}
        losses.update({k: v for k, v in out.losses.items() if k != "mse"})
        if self.downstream:
            fvus = [fvu_rows(store[d.name][rows.keep], rows.clean_sites[d.name]) for d in self.downstream]
            losses[DOWNSTREAM_TERM] = self.cfg.downstream_coefficient * torch.stack(fvus).mean()
        out.losses = losses
        return out

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for checkpoints' resume check."""
        return {
            "hookpoint": self.hookpoint.name,
            "downstream": [d.name for d in self.downstream],
            "model": getattr(getattr(self.model, "config", None), "name_or_path", "") or type(self.model).__name__,
        }


def train_e2e(
    saes: Any,
    model: torch.nn.Module,
    tokenizer,
    data: Any,
    hookpoint: str,
    train_config: Any = None,
    out_dir: Any = None,
    **source_kw: Any,
):
    """Train one SAE (a config or SAE: a `TrainResult`) or several (a list or dict: a dict of
    results) end to end at `hookpoint` of the frozen `model`, on token rows of `data`.

    `train_config` is a `TrainConfig` or mapping; its `objective` (default 'e2e') names the
    downstream hookpoints (e2e+ds) and coefficients. `source_kw` go to `E2ESource`
    (`context_size`, `rows_per_batch`, `repeat`, ...). Checkpoints in `out_dir` resume exactly.
    `d_in` is taken from the hookpoint when a config leaves it out.

        saelab.train_e2e({"architecture": "relu", "d_sae": 2048, "l1_coefficient": 1e-3}, model, tok,
                         texts, "model.layers.6", {"steps": 2000, "objective": {"downstream": ["model.layers.8"]}})
    """
    from collections.abc import Mapping

    from saelab.sae.base import SAE
    from saelab.train.trainer import TrainConfig, train, train_many

    values = train_config.model_dump() if isinstance(train_config, TrainConfig) else dict(train_config or {})
    if values.get("objective") in (None, "local"):
        values["objective"] = "e2e"
    cfg = TrainConfig.parse(values)
    objective = E2EObjective(model, hookpoint, cfg.objective)
    try:
        source = E2ESource(model, tokenizer, data, hookpoint, cfg.objective.downstream, **source_kw)
        described = {
            "e2e": {**objective.describe(), **{k: v for k, v in source_kw.items() if isinstance(v, (int, str, bool))}}
        }

        def with_width(entry):
            return entry if isinstance(entry, SAE) or "d_in" in entry else {**entry, "d_in": source.d_in}

        if isinstance(saes, SAE) or (isinstance(saes, Mapping) and "architecture" in saes):
            return train(with_width(saes), source, cfg, out_dir, described, objective)
        many = {k: with_width(v) for k, v in saes.items()} if isinstance(saes, Mapping) else list(map(with_width, saes))
        return train_many(many, source, cfg, out_dir, described, objective)
    finally:
        objective.release()
