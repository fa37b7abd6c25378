"""Downstream fidelity of every kind of dictionary: splice it into the model and score the logits.

`downstream.py` splices an SAE (it reads and writes one site). This module splices the others,
through their config's `read_sites` / `write_sites` and `dictionary(x_concat) -> y_concat`:

- a **transcoder** (reads an MLP's input, writes its output; with `skip`, a skip transcoder): its
  input is captured by a hook during the same forward, and its output replaces the module's output
  at the write site;
- a **cross-layer transcoder** (L read sites, L write sites; the output of layer l may depend on the
  inputs of layers 0..l): the *replacement model* replaces every write site at once, each computed
  from the spliced model's own inputs (closed loop: errors compound through the layers); the
  *open loop* computes every output from the clean inputs instead (errors do not compound);
- a **crosscoder** (reads and writes several sites): every site is read in one clean forward
  first (later sites depend on earlier ones), then every site's reconstruction replaces its
  activation at once, and each site alone; with sites in several models (`alias/hookpoint`), each
  model is spliced with its own sites' part of the reconstruction, which reads every model.

Each intervention is scored against the clean model on the same tokens: CE loss, the mean of
KL(p_clean || p_spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)) over scored
positions (nats), and top-1 agreement (the fraction of positions whose argmax token is unchanged).
CE loss recovered = (CE_ablation - CE_spliced) / (CE_ablation - CE_clean), against replacing the
same sites by zero and by their mean over the evaluation tokens. Activations are replaced only
at the positions the dictionary was trained on (real tokens, not BOS/pad/specials).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.evals.downstream import _bar
from saelab.models import hooks
from saelab.models.text import keep_mask

KL_DIRECTION = (
    "KL(p_clean || p_spliced) = sum_v p_clean(v) * (log p_clean(v) - log p_spliced(v)), nats, mean per position"
)


# ---------------------------------------------------------------------------- results
@dataclass
class SpliceMetrics:
    """One set of sites replaced by the dictionary, beside zero- and mean-ablating the same sites."""

    model: str  # the alias of the model scored ("" for a one-model run)
    sites: list[str]  # what was replaced
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    ce_recovered_vs_zero: float
    ce_recovered_vs_mean: float
    kl_clean_spliced: float  # mean KL(p_clean || p_spliced), nats
    kl_clean_zero_ablation: float
    kl_clean_mean_ablation: float
    top1_agreement_spliced: float  # fraction of positions whose argmax token is the clean one
    top1_agreement_zero_ablation: float
    top1_agreement_mean_ablation: float


@dataclass
class DictionaryFidelity:
    """Every splice of one dictionary; `to_dict` is what results.json holds."""

    kind: str  # transcoder | skip_transcoder | cross_layer_transcoder | crosscoder
    scored_positions: int  # next-token predictions scored (per model)
    spliced_positions: int  # positions whose activations were replaced
    # every write site at once: a transcoder's one site, a CLT's replacement model (closed loop),
    # a one-model crosscoder's every site (None for a crosscoder over several models: see per_model)
    spliced: SpliceMetrics | None = None
    open_loop: SpliceMetrics | None = None  # CLT: every output from the clean inputs
    replacement_note: str = ""  # why a CLT has no closed-loop numbers, when it has none
    per_site: dict[str, SpliceMetrics] = field(default_factory=dict)  # each write site alone
    per_model: dict[str, SpliceMetrics] = field(default_factory=dict)  # crosscoder: one model's sites
    skip_only: SpliceMetrics | None = None  # skip transcoder: x W_skip^T + b_dec alone
    ce_with_error: float = float("nan")  # output + (target - output) spliced: the clean CE exactly
    max_abs_logit_diff_with_error: float = float("nan")  # 0.0 when the splice itself changes nothing
    kl_direction: str = KL_DIRECTION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("spliced", "open_loop", "skip_only"):
            if out[key] is None:
                del out[key]
        for key in ("per_site", "per_model"):
            if not out[key]:
                del out[key]
        if not out["replacement_note"]:
            del out["replacement_note"]
        return out


# ---------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class _Site:
    name: str  # as the dictionary's config names it
    alias: str  # "" for a one-model run
    hp: hooks.Hookpoint


def _models_by_alias(model: torch.nn.Module | dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    if isinstance(model, torch.nn.Module):
        return {"": model}
    if not model:
        raise ConfigError("no model given to splice into")
    return dict(model)


def _resolve(name: str, models: dict[str, torch.nn.Module], what: str) -> _Site:
    alias, path = hooks.split_site(name)
    if alias not in models:
        if alias == "" and len(models) == 1:
            alias = next(iter(models))
        else:
            have = ", ".join(repr(a) for a in models if a) or "one model, no aliases"
            raise ConfigError(
                f"{what} '{name}' names model alias {alias!r}, but the models given are: {have}; "
                "name sites alias/hookpoint with those aliases"
            )
    model = models[alias]
    try:
        hps = hooks.resolve(model, path)
    except ConfigError as exc:
        raise ConfigError(f"{what} of the dictionary: {exc}") from None
    if len(hps) != 1:
        raise ConfigError(f"{what} '{name}' matches {len(hps)} modules; name the one the dictionary was trained on")
    return _Site(name, alias, hps[0])


def _check_widths(
    sites: list[_Site], width: int, total: int, what: str, models: dict[str, torch.nn.Module], model_names: dict
) -> None:
    """Every site of `sites` must be `width` wide (the dictionary's `total` split evenly)."""
    by_alias: dict[str, list[_Site]] = {}
    for s in sites:
        by_alias.setdefault(s.alias, []).append(s)
    for alias, group in by_alias.items():
        model = models[alias]
        ids = torch.zeros((1, 2), dtype=torch.int64, device=next(model.parameters()).device)
        acts = hooks.run(model, ids, [s.hp for s in group])
        for s in group:
            w = acts[s.hp.name].shape[-1]
            if w != width:
                share = f" ({total} over {len(sites)} sites)" if len(sites) > 1 else ""
                name = model_names.get(alias) or type(model).__name__
                raise ConfigError(
                    f"{what} '{s.name}' of model {name} has width {w} but the dictionary expects {width}{share}; "
                    "use the model and hookpoints the dictionary was trained on"
                )


def kind_of(sae) -> str:
    if getattr(sae, "splice_kind", None):
        return sae.splice_kind
    cfg = sae.cfg
    reads, writes = cfg.read_sites or [], cfg.write_sites or []
    if reads == writes:
        return "sae" if len(reads) <= 1 else "crosscoder"
    if len(reads) == 1 and len(writes) == 1:
        return "skip_transcoder" if cfg.skip else "transcoder"
    return "cross_layer_transcoder"


@dataclass
class StackConfig:
    """The sites and widths of a `TranscoderStack`, named as a dictionary's config names them."""

    read_sites: list[str]
    write_sites: list[str]
    d_in: int
    output_width: int
    skip: bool = False

    @property
    def site(self) -> list[str]:
        return self.read_sites


class TranscoderStack(torch.nn.Module):
    """Per-layer transcoders (a PLT) as one dictionary that reads every layer's input and writes every
    layer's output: output l is transcoder l of input l, so its replacement model (`splice_fidelity`,
    closed loop) is the model with every one of those MLPs replaced at once."""

    splice_kind = "per_layer_transcoders"

    def __init__(self, transcoders: list):
        super().__init__()
        if not transcoders:
            raise ConfigError("a transcoder stack needs at least one transcoder")
        bad = [i for i, t in enumerate(transcoders) if not t.cfg.is_transcoder]
        if bad:
            raise ConfigError(f"dictionaries {bad} of the stack are not transcoders (no write_site)")
        widths = {(t.cfg.d_in, t.cfg.output_width) for t in transcoders}
        if len(widths) != 1:
            raise ConfigError(f"the stack's transcoders have different widths {sorted(widths)}; stack equal ones")
        self.transcoders = torch.nn.ModuleList(transcoders)
        self.cfg = StackConfig(
            [t.cfg.site for t in transcoders],
            [t.cfg.write_site for t in transcoders],
            sum(t.cfg.d_in for t in transcoders),
            sum(t.cfg.output_width for t in transcoders),
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        parts = x.split([t.cfg.d_in for t in self.transcoders], -1)
        return torch.cat([t(p, tokens=tokens) for t, p in zip(self.transcoders, parts)], -1)


# ---------------------------------------------------------------------------- scoring
class _Scores:
    """Per-position CE, KL(p_clean || p) and top-1 agreement of every named forward, per model."""

    def __init__(self):
        self.ce: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.kl: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.top1: dict[tuple[str, str], list[torch.Tensor]] = {}

    def add(self, key: tuple[str, str], logits: torch.Tensor, clean: dict, ids: torch.Tensor, score: torch.Tensor):
        logq = torch.log_softmax(logits[:, :-1].float(), -1)[score]
        self.ce.setdefault(key, []).append(-logq.gather(-1, ids[:, 1:][score][:, None]).squeeze(-1))
        if "logp" in clean:
            logp = clean["logp"]
            self.kl.setdefault(key, []).append((logp.exp() * (logp - logq)).sum(-1))
            self.top1.setdefault(key, []).append((logq.argmax(-1) == clean["argmax"]).double())

    def mean(self, table: dict, key: tuple[str, str]) -> float:
        return float(torch.cat(table[key]).double().mean())

    def metrics(self, alias: str, sites: list[str], name: str, zero: str, mean: str) -> SpliceMetrics:
        ce = {k: self.mean(self.ce, (alias, k)) for k in ("clean", name, zero, mean)}

        def recovered(base: float) -> float:
            return (base - ce[name]) / (base - ce["clean"]) if base != ce["clean"] else float("nan")

        return SpliceMetrics(
            model=alias,
            sites=list(sites),
            ce_clean=ce["clean"],
            ce_spliced=ce[name],
            ce_zero_ablation=ce[zero],
            ce_mean_ablation=ce[mean],
            ce_recovered_vs_zero=recovered(ce[zero]),
            ce_recovered_vs_mean=recovered(ce[mean]),
            kl_clean_spliced=self.mean(self.kl, (alias, name)),
            kl_clean_zero_ablation=self.mean(self.kl, (alias, zero)),
            kl_clean_mean_ablation=self.mean(self.kl, (alias, mean)),
            top1_agreement_spliced=self.mean(self.top1, (alias, name)),
            top1_agreement_zero_ablation=self.mean(self.top1, (alias, zero)),
            top1_agreement_mean_ablation=self.mean(self.top1, (alias, mean)),
        )


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kwargs = {"use_cache": False} if hooks._accepts_use_cache(model) else {}
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@contextlib.contextmanager
def _replacing(model: torch.nn.Module, rows: dict[hooks.Hookpoint, torch.Tensor], keep: torch.Tensor) -> Iterator[None]:
    """Inside the block, the activation at each hookpoint is `rows[hp]` at the `keep` positions."""
    with contextlib.ExitStack() as stack:
        for hp, value in rows.items():
            stack.enter_context(hooks.intervene(model, hp, lambda x, v=value: v.to(x.device), keep))
        yield


@contextlib.contextmanager
def _closed_loop(
    model: torch.nn.Module,
    reads: list[hooks.Hookpoint],
    writes: list[hooks.Hookpoint],
    keep: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    error_term: bool = False,
) -> Iterator[None]:
    """Inside the block, write site l's output (at `keep`) is chunk l of `fn(x)`, where x holds the
    inputs this very forward gave read sites 0..l (zeros for the later ones, which a causal
    dictionary's output l does not depend on). With `error_term`, output + (own - output) in float64."""
    modules = dict(model.named_modules())
    n = len(reads)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def read_hook(i: int, hp: hooks.Hookpoint) -> Callable:
        def hook(module, args, *rest):
            value = args if hp.io == "input" else rest[0]
            store[i] = hooks.first_tensor(value)[keep.to(hooks.first_tensor(value).device)].detach()

        return hook

    def write_hook(i: int, hp: hooks.Hookpoint) -> Callable:
        def swap(act: torch.Tensor) -> torch.Tensor:
            missing = [str(reads[j]) for j in range(i + 1) if j not in store]
            if missing:
                raise ConfigError(
                    f"read site(s) {missing} did not run before write site {hp} in the forward pass; a "
                    "transcoder's output at a layer is computed from inputs read earlier in the same forward"
                )
            x = torch.cat([store[j] if j <= i else store[0].new_zeros(store[0].shape) for j in range(n)], -1)
            full = fn(x.float())
            out_w = full.shape[-1] // n
            y = full[:, i * out_w : (i + 1) * out_w]
            mask = keep.to(act.device)
            new = act.clone()
            if error_term:
                own = act[mask].double()
                y = y.double() + (own - y.double())
            new[mask] = y.to(act.dtype)
            return new

        return swap

    try:
        for i, hp in enumerate(reads):
            mod = modules[hp.module]
            if hp.io == "input":
                handles.append(mod.register_forward_pre_hook(read_hook(i, hp)))
            else:
                handles.append(mod.register_forward_hook(read_hook(i, hp)))
        for i, hp in enumerate(writes):
            swap = write_hook(i, hp)
            mod = modules[hp.module]
            if hp.io == "input":
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda m, args, s=swap: hooks.replace_first(args, s(hooks.first_tensor(args)))
                    )
                )
            else:
                handles.append(
                    mod.register_forward_hook(
                        lambda m, args, out, s=swap: hooks.replace_first(out, s(hooks.first_tensor(out)))
                    )
                )
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def is_causal(fn: Callable[[torch.Tensor], torch.Tensor], n: int, d_in: int, device, seed: int = 0) -> bool:
    """Whether output chunk l of `fn` depends only on input chunks 0..l (checked on random inputs):
    what the closed-loop replacement model needs, since layer l runs before layers l+1.. exist."""
    if n == 1:
        return True
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, d_in, generator=gen).to(device)
    w = d_in // n
    full = fn(x)
    ow = full.shape[-1] // n
    for i in range(n - 1):
        cut = x.clone()
        cut[:, (i + 1) * w :] = 0
        part = fn(cut)[:, i * ow : (i + 1) * ow]
        ref = full[:, i * ow : (i + 1) * ow]
        if not torch.allclose(part, ref, rtol=1e-4, atol=1e-5 * (1 + float(ref.abs().max()))):
            return False
    return True


# ---------------------------------------------------------------------------- entry point
@torch.no_grad()
def splice_fidelity(
    dictionary,
    model: torch.nn.Module | dict[str, torch.nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    specials: torch.Tensor | None = None,
    *,
    per_site: bool = True,
    model_names: dict[str, str] | None = None,
) -> DictionaryFidelity:
    """Splice a transcoder, skip transcoder, cross-layer transcoder or crosscoder into `model` (or
    several models `{alias: model}`, for sites named `alias/hookpoint`) over `batches` of
    (input_ids [B, T], attention_mask [B, T]), all models reading the same tokens. `per_site`
    also splices each write site alone (crosscoders and CLTs: one more set of forwards per site).
    The models are only read: no parameter changes and no gradient is computed."""
    models = _models_by_alias(model)
    names = model_names or {}
    cfg = dictionary.cfg
    if cfg.read_sites is None:
        raise ConfigError(
            "the dictionary's config names no site; give it `site` (and `write_site`), or splice an SAE with "
            "saelab.evals.downstream.downstream_fidelity(sae, model, hookpoint, ...)"
        )
    kind = kind_of(dictionary)
    if kind == "sae":
        raise ConfigError("an SAE reads and writes one site: use saelab.evals.downstream.downstream_fidelity")
    reads = [_resolve(s, models, "read site") for s in cfg.read_sites]
    writes = [_resolve(s, models, "write site") for s in cfg.write_sites]
    if kind != "crosscoder":
        aliases = {s.alias for s in reads + writes}
        if len(aliases) > 1:
            raise ConfigError(
                f"a transcoder reads and writes sites of one model, but these name models {sorted(aliases)}"
            )
        if len(reads) != len(writes):
            raise ConfigError(
                f"the dictionary reads {len(reads)} sites and writes {len(writes)}; splicing a transcoder pairs "
                "read site l with write site l"
            )
    _check_widths(reads, cfg.d_in // len(reads), cfg.d_in, "read site", models, names)
    _check_widths(writes, cfg.output_width // len(writes), cfg.output_width, "write site", models, names)
    dictionary = dictionary.eval()
    batches = list(batches)
    if not batches:
        raise ConfigError("no text to evaluate on: the dataset gave no rows")
    devices = {a: next(m.parameters()).device for a, m in models.items()}
    training = {a: m.training for a, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        if kind == "crosscoder":
            return _crosscoder(dictionary, models, devices, reads, batches, specials, per_site)
        return _transcoder(dictionary, kind, models, devices, reads, writes, batches, specials, per_site)
    finally:
        for a, m in models.items():
            m.train(training[a])


def _means(models, devices, sites: list[_Site], batches, specials) -> dict[_Site, torch.Tensor]:
    """Each site's mean activation over the kept positions of `batches`: the mean-ablation value."""
    totals: dict[_Site, torch.Tensor] = {}
    count = 0
    for ids, mask in _bar(batches, "fidelity: mean activations (ablation baseline)"):
        keep = keep_mask(ids, mask, specials)
        count += int(keep.sum())
        for alias in {s.alias for s in sites}:
            group = [s for s in sites if s.alias == alias]
            acts = hooks.run(models[alias], ids.to(devices[alias]), [s.hp for s in group], mask.to(devices[alias]))
            for s in group:
                a = acts[s.hp.name][keep.to(devices[alias])].double().sum(0)
                totals[s] = a if s not in totals else totals[s] + a
    if count == 0:
        raise ConfigError("every position is padding or a special token; nothing to splice")
    return {s: (t / count).float() for s, t in totals.items()}


def _clean(model, ids, mask, sites: list[_Site], keep) -> tuple[torch.Tensor, dict[_Site, torch.Tensor]]:
    """Clean logits and each site's activations at `keep`, from one forward."""
    with hooks.capture(model, [s.hp for s in sites], stop_early=False) as store:
        logits = _logits(model, ids, mask)
    return logits, {s: store[s.hp.name][keep.to(store[s.hp.name].device)].float() for s in sites}


def _clean_scores(logits: torch.Tensor, score: torch.Tensor) -> dict:
    logp = torch.log_softmax(logits[:, :-1].float(), -1)[score]
    return {"logp": logp, "argmax": logp.argmax(-1)}


def _transcoder(dictionary, kind, models, devices, reads, writes, batches, specials, per_site) -> DictionaryFidelity:
    alias = reads[0].alias
    model, device = models[alias], devices[alias]
    n = len(writes)
    cfg = dictionary.cfg
    means = _means(models, devices, writes, batches, specials)
    r_hps, w_hps = [s.hp for s in reads], [s.hp for s in writes]
    w_out = cfg.output_width // n

    def split(y: torch.Tensor) -> dict[hooks.Hookpoint, torch.Tensor]:
        return {hp: y[:, i * w_out : (i + 1) * w_out] for i, hp in enumerate(w_hps)}

    def call(tokens: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        dev = next(dictionary.parameters()).device
        return lambda x: dictionary(x.to(dev), tokens=tokens.to(dev)).to(device)

    causal = is_causal(lambda x: dictionary(x), n, cfg.d_in, next(dictionary.parameters()).device)
    note = (
        ""
        if causal
        else "no closed-loop replacement model: this dictionary's output at a layer depends on inputs of later "
        "layers (e.g. a top-k taken over every layer at once), which do not exist yet when that layer runs; "
        "the open-loop numbers use the clean inputs"
    )
    scores = _Scores()
    spliced = max_diff = 0
    for ids, mask in _bar(batches, "fidelity: clean + spliced forwards"):
        ids, mask = ids.to(device), mask.to(device)
        keep = keep_mask(ids, mask, specials)
        score = mask[:, :-1].bool() & mask[:, 1:].bool()
        spliced += int(keep.sum())
        tokens = ids[keep]
        clean_logits, acts = _clean(model, ids, mask, reads, keep)
        clean = _clean_scores(clean_logits, score)
        scores.add((alias, "clean"), clean_logits, {}, ids, score)
        x_clean = torch.cat([acts[s] for s in reads], -1)
        f = call(tokens)
        rows_n = int(keep.sum())

        def forward(name: str, ctx) -> torch.Tensor:
            with ctx:
                logits = _logits(model, ids, mask)
            scores.add((alias, name), logits, clean, ids, score)
            return logits

        zero = {hp: torch.zeros(rows_n, w_out, device=device) for hp in w_hps}
        mean = {hp: means[s].to(device).expand(rows_n, -1) for hp, s in zip(w_hps, writes)}
        if causal:
            forward("spliced", _closed_loop(model, r_hps, w_hps, keep, f))
            logits = forward("with_error", _closed_loop(model, r_hps, w_hps, keep, f, error_term=True))
        else:
            logits = forward(
                "with_error", _replacing(model, split(_with_error(f, x_clean, model, ids, mask, writes, keep)), keep)
            )
        max_diff = max(max_diff, float((logits - clean_logits).abs().max()))
        y_open = split(f(x_clean)) if n > 1 or not causal else {}
        if y_open:
            forward("open_loop", _replacing(model, y_open, keep))
        forward("zero", _replacing(model, zero, keep))
        forward("mean", _replacing(model, mean, keep))
        if cfg.skip:  # the affine skip alone: x W_skip^T + b_dec
            skip = _skip_only(dictionary, device)
            ctx = (
                _closed_loop(model, r_hps, w_hps, keep, skip)
                if causal
                else _replacing(model, split(skip(x_clean)), keep)
            )
            forward("skip_only", ctx)
        if per_site and n > 1:
            for hp, s in zip(w_hps, writes):
                forward(f"site:{s.name}", _replacing(model, {hp: y_open[hp]}, keep))
                forward(f"zero:{s.name}", _replacing(model, {hp: zero[hp]}, keep))
                forward(f"mean:{s.name}", _replacing(model, {hp: mean[hp]}, keep))
    write_names = [s.name for s in writes]
    out = DictionaryFidelity(
        kind=kind,
        scored_positions=int(torch.cat(scores.ce[(alias, "clean")]).numel()),
        spliced_positions=spliced,
        replacement_note=note,
        ce_with_error=scores.mean(scores.ce, (alias, "with_error")),
        max_abs_logit_diff_with_error=max_diff,
    )
    if causal:
        out.spliced = scores.metrics(alias, write_names, "spliced", "zero", "mean")
    if (alias, "open_loop") in scores.ce:
        out.open_loop = scores.metrics(alias, write_names, "open_loop", "zero", "mean")
    if cfg.skip:
        out.skip_only = scores.metrics(alias, write_names, "skip_only", "zero", "mean")
    if per_site and n > 1:
        for s in writes:
            out.per_site[s.name] = scores.metrics(alias, [s.name], f"site:{s.name}", f"zero:{s.name}", f"mean:{s.name}")
    return out


def _skip_only(dictionary, device) -> Callable[[torch.Tensor], torch.Tensor]:
    dev = dictionary.W_skip.device
    return lambda x: (dictionary.skip_out(x.to(dev)) + dictionary.b_dec).to(device)


def _with_error(f, x_clean, model, ids, mask, writes, keep) -> torch.Tensor:
    """f(x) + (y - f(x)) in float64 for the clean outputs y: exactly y, routed through the dictionary."""
    _, ys = _clean(model, ids, mask, writes, keep)
    y = torch.cat([ys[s] for s in writes], -1).double()
    y_hat = f(x_clean).double()
    return (y_hat + (y - y_hat)).float()


def _crosscoder(dictionary, models, devices, sites, batches, specials, per_site) -> DictionaryFidelity:
    means = _means(models, devices, sites, batches, specials)
    n = len(sites)
    width = dictionary.cfg.d_in // n
    dict_device = next(dictionary.parameters()).device
    aliases = list(dict.fromkeys(s.alias for s in sites))
    scores = _Scores()
    spliced = 0
    max_diff = 0.0
    for ids, mask in _bar(batches, "fidelity: clean + spliced forwards"):
        keep = keep_mask(ids, mask, specials)
        score = mask[:, :-1].bool() & mask[:, 1:].bool()
        spliced += int(keep.sum())
        rows_n = int(keep.sum())
        clean_logits, clean, acts = {}, {}, {}
        for a in aliases:  # every site read in a clean forward first
            group = [s for s in sites if s.alias == a]
            d = devices[a]
            clean_logits[a], got = _clean(models[a], ids.to(d), mask.to(d), group, keep)
            acts.update(got)
            clean[a] = _clean_scores(clean_logits[a], score.to(d))
            scores.add((a, "clean"), clean_logits[a], {}, ids.to(d), score.to(d))
        x = torch.cat([acts[s].to(dict_device) for s in sites], -1)
        x_hat = dictionary(x, tokens=ids[keep].to(dict_device)).float()
        recon = {s: x_hat[:, i * width : (i + 1) * width] for i, s in enumerate(sites)}
        exact = {s: (recon[s].double() + (acts[s].double().to(dict_device) - recon[s].double())).float() for s in sites}
        for a in aliases:
            model, d = models[a], devices[a]
            ids_a, mask_a, score_a, keep_a = ids.to(d), mask.to(d), score.to(d), keep.to(d)
            group = [s for s in sites if s.alias == a]

            def forward(name: str, rows: dict[_Site, torch.Tensor]) -> torch.Tensor:
                with _replacing(model, {s.hp: v.to(d) for s, v in rows.items()}, keep_a):
                    logits = _logits(model, ids_a, mask_a)
                scores.add((a, name), logits, clean[a], ids_a, score_a)  # noqa: B023
                return logits

            zero = {s: torch.zeros(rows_n, width, device=d) for s in group}
            mean = {s: means[s].to(d).expand(rows_n, -1) for s in group}
            forward("spliced", {s: recon[s] for s in group})
            logits = forward("with_error", {s: exact[s] for s in group})
            max_diff = max(max_diff, float((logits - clean_logits[a]).abs().max()))
            forward("zero", zero)
            forward("mean", mean)
            if per_site:
                for s in group:
                    forward(f"site:{s.name}", {s: recon[s]})
                    forward(f"zero:{s.name}", {s: zero[s]})
                    forward(f"mean:{s.name}", {s: mean[s]})
    first = aliases[0]
    out = DictionaryFidelity(
        kind="crosscoder",
        scored_positions=int(torch.cat(scores.ce[(first, "clean")]).numel()),
        spliced_positions=spliced,
        ce_with_error=scores.mean(scores.ce, (first, "with_error")),
        max_abs_logit_diff_with_error=max_diff,
    )
    for a in aliases:
        names = [s.name for s in sites if s.alias == a]
        m = scores.metrics(a, names, "spliced", "zero", "mean")
        if len(aliases) == 1:
            out.spliced = m
        else:
            out.per_model[a] = m
        if per_site:
            for s in (s for s in sites if s.alias == a):
                out.per_site[s.name] = scores.metrics(a, [s.name], f"site:{s.name}", f"zero:{s.name}", f"mean:{s.name}")
    return out


# ---------------------------------------------------------------------------- one entry point
def dictionary_fidelity(
    dictionary,
    model: torch.nn.Module | dict[str, torch.nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    specials: torch.Tensor | None = None,
    *,
    hookpoint: str | None = None,
    per_site: bool = True,
    model_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The downstream record of any dictionary, `kind` first: an SAE through `downstream_fidelity`
    (at its `site`, else `hookpoint`: the one its source read), every other kind through
    `splice_fidelity`. What `saelab fidelity` prints and a run's `results.json` holds."""
    from saelab.evals.downstream import downstream_fidelity

    models = _models_by_alias(model)
    names = model_names or {}
    kind = kind_of(dictionary)
    if kind != "sae":
        m = splice_fidelity(dictionary, models, batches, specials, per_site=per_site, model_names=names)
        return m.to_dict()
    site = (dictionary.cfg.read_sites or [hookpoint])[0]
    if site is None:
        raise ConfigError("which hookpoint does the SAE read? its config names no site and none was given")
    s = _resolve(site, models, "site")
    name = names.get(s.alias) or ""
    m = downstream_fidelity(dictionary, models[s.alias], s.hp.name, batches, specials, model_name=name)
    return {"kind": "sae", **m.to_dict()}


def model_source_spec(saved: dict[str, Any] | None) -> dict[str, Any]:
    """The model, hookpoint(s) and text behind a recorded source config: a model source as it is,
    a cache's from its manifest; {} for any other source (toy worlds, tensor files)."""
    saved = dict(saved or {})
    if saved.get("type") == "cache":
        from saelab.activations.cache import read_manifest

        manifest = read_manifest(saved["path"])
        keys = ("models" if manifest.get("models") else "model", "data", "context_size", "packing", "exclude_special")
        out = {k: manifest[k] for k in keys if manifest.get(k) is not None}
        out["hookpoint"] = saved.get("hookpoint") or next(iter(manifest["hookpoints"]))
        return out
    if saved.get("type") not in (None, "model"):
        return {}
    saved.pop("type", None)
    return saved


_LOAD_KEYS = ("gguf_file", "dtype", "device", "task", "context_size")


def models_from_spec(spec: dict[str, Any]) -> tuple[dict[str, torch.nn.Module], Any, dict[str, str]]:
    """({alias: model}, the tokenizer, {alias: model name}) of a model-source spec: one model
    (alias "") from `model`, or several from `models` (they share one vocabulary, so the first
    one's tokenizer makes the text rows)."""
    from saelab.models.source import _load_all

    if spec.get("model") is None and spec.get("models") is None:
        raise ConfigError("which model? the source names none (pass --model, or a `model:` key)")
    load = {k: v for k, v in spec.items() if k in (*_LOAD_KEYS, "model", "models")}
    models, tokenizers, names = _load_all(load)
    if isinstance(models, torch.nn.Module):
        return {"": models}, tokenizers, {"": str(names)}
    return models, next(iter(tokenizers.values())), {a: str(n) for a, n in names.items()}


def fidelity_from_spec(
    dictionary, spec: dict[str, Any], rows: int = 32, skip_docs: int = 0, per_site: bool = True
) -> dict[str, Any]:
    """`dictionary_fidelity` on `rows` rows of the spec's text (`skip_docs` documents in), with the
    model(s) it names; `spec` is a model-source config (see `model_source_spec`)."""
    from saelab.models.text import eval_batches, special_ids

    models, tokenizer, names = models_from_spec(spec)
    batches = list(eval_batches(tokenizer, spec, rows, skip_docs))
    specials = special_ids(tokenizer) if spec.get("exclude_special", True) else None
    hp = spec.get("hookpoint")
    hp = hp[0] if isinstance(hp, list) and hp else hp
    record = dictionary_fidelity(
        dictionary, models, batches, specials, hookpoint=hp, per_site=per_site, model_names=names
    )
    model = names[""] if "" in names else names
    return {"model": model, "rows": sum(int(b[0].shape[0]) for b in batches), **record}
