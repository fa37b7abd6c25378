"""Contexts that make each latent fire, collected in one streaming pass over tokens.

Memory is fixed by the settings, not by the number of tokens, so millions of tokens fit:

- **Top-k** (exact): every row of the stream offers, per latent, its peak token (the first
  position of the row's maximum); the `top_k` highest peaks are kept, best first, ties to the
  earlier row. One context per row, so a latent that fires on a run of tokens does not fill its
  top list with copies of one window.
- **Quantiles** (a streaming estimate): a uniform sample without replacement of the latent's
  fired tokens (bottom-`reservoir` of i.i.d. random keys, which is uniform whatever the order
  and batch sizes of the stream), split at the end into `n_bins` equal-count bins by value,
  lowest first; each bin keeps `per_bin` of its members at random. The bin edges are therefore
  the sample's quantiles. A first pass over a prefix was the alternative; it was not chosen
  because `batches` is read once (a generator in general) and a prefix misjudges rare latents:
  one that first fires after the prefix would have no edges at all, while the reservoir is
  uniform over the whole stream. When a latent fires on at most `reservoir` tokens the sample is
  all of them and the bins are exact.
- **Value histogram** (exact): counts of nonzero activations in bins of equal width, a power
  of two chosen from the first values seen and doubled (neighbouring bins merged) whenever a
  larger value arrives, so the counts are exact and the range covers the maximum.
- **Random windows**: a uniform sample of windows around kept tokens, with the tracked latents
  that fire anywhere in each, for non-activating examples (autointerp negatives).

Positions whose attention mask is 0 (padding) or whose token is special (BOS, EOS, pad; see
`saelab.models.text.special_ids`) are never counted or sampled; they still appear inside a
window as context, with value 0. `doc` is the row index in the stream: a document when rows
are padded documents, a packed chunk otherwise. Activations come from `saelab.models.hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json, write_json

FORMAT = "saelab.contexts/1"
HIST_BINS = 64  # value-histogram bins before trimming (between 33 and 64 are occupied)
ENCODE_ROWS = 4096  # token rows per `sae.encode` call, so [rows, d_sae] stays small


@dataclass(frozen=True)
class Context:
    """A window of tokens and one latent's activation on each (0 where silent or special)."""

    token_ids: list[int]
    values: list[float]
    doc: int  # row of the stream the window comes from
    position: int  # index in that row of the token the window was chosen for (its peak)
    offset: int | None = None  # index of that token inside the window; None: the window's argmax

    @property
    def peak(self) -> int:
        """Index in the window of the token the window was chosen for."""
        if self.offset is not None:
            return self.offset
        return max(range(len(self.values)), key=self.values.__getitem__) if self.values else 0

    @property
    def value(self) -> float:
        return self.values[self.peak] if self.values else 0.0


@dataclass(frozen=True)
class Histogram:
    """Counts of values in bins [edges[i], edges[i+1]); the last bin includes its right edge."""

    edges: list[float]
    counts: list[int]


@dataclass
class LatentContexts:
    latent: int
    n_tokens: int  # tokens seen (special tokens and padding excluded)
    n_fired: int  # of those, tokens where this latent is nonzero
    density: float
    max_value: float
    top: list[Context]  # exact top-k by peak activation, best first
    quantiles: list[list[Context]]  # activation-quantile bins of fired tokens, lowest first
    quantile_edges: list[float]  # n_bins + 1 edges (sample quantiles); [] when it never fired
    value_histogram: Histogram  # exact counts of nonzero activations


@dataclass
class ContextCollection:
    hookpoint: str
    d_sae: int
    n_tokens: int
    n_rows: int
    window: int  # tokens per window
    before: int  # tokens before the chosen token in a full window
    latents: dict[int, LatentContexts]
    density: list[float]  # every latent of the SAE, tracked or not
    max_values: list[float]
    random_windows: list[list[int]]  # token ids of random windows (negatives)
    random_fired: list[list[int]]  # per random window: tracked latents that fire anywhere in it
    tokenizer_name: str | None = None
    tokens: dict[int, str] = field(default_factory=dict)  # decoded text of every id in a window
    metadata: dict[str, Any] = field(default_factory=dict)

    def text(self, ids: Iterable[int]) -> list[str]:
        """Decoded text of each token id (ids the collection has no text for show as <id>)."""
        return [self.tokens.get(int(i), f"<{int(i)}>") for i in ids]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["latents"] = [asdict(lc) for lc in self.latents.values()]
        d["tokens"] = {str(k): v for k, v in self.tokens.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContextCollection:
        if d.get("format") != FORMAT:
            raise FileFormatError(f"not a saelab context collection (format {d.get('format')!r}, expected {FORMAT})")

        def ctx(c: dict[str, Any]) -> Context:
            return Context(list(c["token_ids"]), list(c["values"]), int(c["doc"]), int(c["position"]), c["offset"])

        latents = {}
        for lc in d["latents"]:
            latents[int(lc["latent"])] = LatentContexts(
                latent=int(lc["latent"]),
                n_tokens=int(lc["n_tokens"]),
                n_fired=int(lc["n_fired"]),
                density=float(lc["density"]),
                max_value=float(lc["max_value"]),
                top=[ctx(c) for c in lc["top"]],
                quantiles=[[ctx(c) for c in b] for b in lc["quantiles"]],
                quantile_edges=list(lc["quantile_edges"]),
                value_histogram=Histogram(**lc["value_histogram"]),
            )
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("latents", "tokens")}
        return cls(latents=latents, tokens={int(k): v for k, v in d.get("tokens", {}).items()}, **fields)

    def save(self, path: str | Path) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ContextCollection:
        d = read_json(path, "collect the contexts again (saelab dashboard ... --out DIR writes contexts.json)")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FileFormatError):
                raise
            raise FileFormatError(f"{path} is not a complete context collection ({exc!r}); collect again") from None


def collect_contexts(
    sae,
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    hookpoint: str,
    tokenizer=None,
    specials: torch.Tensor | None = None,
    latents: list[int] | None = None,
    top_k: int = 20,
    n_bins: int = 10,
    per_bin: int = 10,
    window: int = 32,
    reservoir: int | None = None,
    n_random: int = 200,
    seed: int = 0,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> ContextCollection:
    """Run `model` over `batches` of (input_ids, attention_mask), encode the activations at
    `hookpoint` with `sae` and collect contexts for `latents` (default: all of them).

    Special tokens are `specials` if given, else the tokenizer's (`special_ids`), else the ids
    the model's config names (BOS, EOS, pad). `window` tokens per context, the chosen token
    3/4 of the way in; `reservoir` fired tokens sampled per latent for the quantile bins
    (default 4 * n_bins * per_bin). Memory: about (top_k + reservoir) * window * 16 bytes per
    tracked latent, whatever the number of tokens.
    """
    from saelab.evals.downstream import check_width
    from saelab.models import hooks
    from saelab.models.text import keep_mask, special_ids
    from saelab.progress import bar as progress_bar

    hp = hooks.resolve(model, hookpoint)
    if len(hp) != 1:
        raise ConfigError(f"hookpoint '{hookpoint}' matches {len(hp)} modules; name exactly one")
    hp = hp[0]
    check_width(model, hp, sae.cfg.d_in)
    if specials is None:
        specials = special_ids(tokenizer) if tokenizer is not None else _config_specials(model)
    device = next(model.parameters()).device
    sae_device = sae.W_dec.device
    collector = ContextCollector(sae.cfg.d_sae, latents, top_k, n_bins, per_bin, window, reservoir, n_random, seed)
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = progress_bar(batches, total=total, desc="contexts", unit="batch", enabled=progress)
    with torch.no_grad():
        for ids, mask in bar:
            acts = hooks.run(model, ids.to(device), [hp], mask.to(device))[hp.name]
            keep = keep_mask(ids, mask, specials)
            x = acts[keep.to(acts.device)].float().to(sae_device)
            chunks = [sae.encode(x[i : i + ENCODE_ROWS]).cpu() for i in range(0, len(x), ENCODE_ROWS)]
            collector.update(ids, mask, keep, torch.cat(chunks) if chunks else torch.zeros(0, sae.cfg.d_sae))
            bar.set_postfix(tokens=collector.n_tokens, refresh=False)
    return collector.result(hp.name, tokenizer, metadata)


def _config_specials(model: torch.nn.Module) -> torch.Tensor:
    """BOS, EOS and pad ids from the model's config (an id or a list of ids each)."""
    cfg = getattr(model, "config", None)
    flat: set[int] = set()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, k, None)
        if v is not None:
            flat.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return torch.tensor(sorted(flat), dtype=torch.int64)


# ---------------------------------------------------------------------------- streaming state
class ContextCollector:
    """The running state of `collect_contexts`, fed encoded batches; usable without a model.

    `update(ids, mask, keep, acts)` takes one batch: token ids and attention mask `[B, T]`, the
    kept positions `keep [B, T]`, and the SAE's latents at the kept positions `[keep.sum(), d_sae]`
    (in row-major order of `keep`).
    """

    def __init__(
        self,
        d_sae: int,
        latents: list[int] | None = None,
        top_k: int = 20,
        n_bins: int = 10,
        per_bin: int = 10,
        window: int = 32,
        reservoir: int | None = None,
        n_random: int = 200,
        seed: int = 0,
    ):
        if latents is None:
            latents = list(range(d_sae))
        bad = [i for i in latents if not 0 <= int(i) < d_sae]
        if bad:
            raise ConfigError(f"latent(s) {bad[:5]} out of range; this SAE has d_sae={d_sae} (ids 0..{d_sae - 1})")
        if len(set(latents)) != len(latents):
            raise ConfigError("the latent list repeats an id; give each latent once")
        for name, v, lo in [("top_k", top_k, 0), ("n_bins", n_bins, 0), ("per_bin", per_bin, 0), ("window", window, 1)]:
            if int(v) < lo:
                raise ConfigError(f"{name} must be at least {lo} (got {v})")
        self.d_sae, self.latents = d_sae, [int(i) for i in latents]
        self.cols = torch.tensor(self.latents, dtype=torch.int64)
        self.top_k, self.n_bins, self.per_bin = int(top_k), int(n_bins), int(per_bin)
        self.window = int(window)
        self.before = self.window * 3 // 4  # the chosen token sits 3/4 of the way in: what led to it
        self.reservoir = int(reservoir) if reservoir is not None else 4 * self.n_bins * self.per_bin
        if self.n_bins and self.reservoir < self.n_bins:
            raise ConfigError(f"reservoir ({self.reservoir}) must hold at least one token per bin ({self.n_bins})")
        self.n_random = int(n_random)
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        n, w = len(self.latents), self.window
        self.n_tokens = 0
        self.n_rows = 0
        self.fired_all = torch.zeros(d_sae, dtype=torch.int64)
        self.max_all = torch.zeros(d_sae)
        self.top = _Slots(self.top_k, n, w, self.before)
        self.res = _Slots(self.reservoir if self.n_bins else 0, n, w, self.before)
        self.rand_key = torch.full((self.n_random,), math.inf)
        self.rand_ids = torch.full((self.n_random, w), -1, dtype=torch.int64)
        self.rand_fired = torch.zeros((self.n_random, n), dtype=torch.bool)
        self.hist_w = torch.zeros(n, dtype=torch.float64)  # bin width per latent; 0 until it fires
        self.hist = torch.zeros((n, HIST_BINS), dtype=torch.int64)

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def update(self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, acts: torch.Tensor) -> None:
        ids, mask, keep = ids.cpu(), mask.cpu().bool(), keep.cpu().bool()
        acts = acts.detach().float().cpu()
        B, T = ids.shape
        if acts.shape != (int(keep.sum()), self.d_sae):
            raise ConfigError(f"latents have shape {tuple(acts.shape)}, expected [{int(keep.sum())}, {self.d_sae}]")
        self.fired_all += (acts > 0).sum(0)
        if acts.numel():
            self.max_all = torch.maximum(self.max_all, acts.max(0).values.clamp(min=0))
        F = torch.zeros(B, T, len(self.latents))
        F[keep] = acts[:, self.cols]
        row0 = self.n_rows
        self.n_rows += B
        self.n_tokens += int(keep.sum())
        window = _Windows(ids, mask, F, self.before, self.window)

        # top-k: each row's peak per latent
        peak, arg = F.max(1)  # [B, n]; the first position of the maximum
        cand = torch.where(peak > 0, peak, -math.inf)
        self.top.merge(cand, lambda r, c: (r, arg[r, c]), window, row0, descending=True)

        # quantile reservoir: the fired tokens with the smallest random keys
        flat = F.reshape(B * T, -1)
        if self.res.size:
            keys = torch.rand(flat.shape, generator=self.gen)
            keys = torch.where(flat > 0, keys, math.inf)
            self.res.merge(keys, lambda t, c: (t // T, t % T), window, row0, descending=False, value=flat)

        # random windows around kept tokens
        if self.n_random:
            k = torch.rand(B * T, generator=self.gen)
            k = torch.where(keep.reshape(-1), k, math.inf)
            allk = torch.cat([self.rand_key, k])
            best, idx = allk.topk(self.n_random, largest=False)
            old = idx < self.n_random
            new_ids = torch.full((self.n_random, self.window), -1, dtype=torch.int64)
            new_fired = torch.zeros_like(self.rand_fired)
            new_ids[old] = self.rand_ids[idx[old]]
            new_fired[old] = self.rand_fired[idx[old]]
            t = idx[~old] - self.n_random
            if t.numel():
                win_ids, win_vals = window.all_latents(t // T, t % T)
                new_ids[~old] = win_ids
                new_fired[~old] = (win_vals > 0).any(1)
            self.rand_key, self.rand_ids, self.rand_fired = best, new_ids, new_fired

        # exact value histogram
        fired = flat > 0
        if fired.any():
            bmax = flat.max(0).values.double()
            start = (self.hist_w == 0) & (bmax > 0)
            self.hist_w[start] = torch.exp2(torch.ceil(torch.log2(bmax[start] / HIST_BINS)))
            while (grow := (bmax >= self.hist_w * HIST_BINS) & (self.hist_w > 0)).any():
                merged = self.hist[grow].reshape(-1, HIST_BINS // 2, 2).sum(-1)
                self.hist[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
                self.hist_w[grow] *= 2
            t, c = fired.nonzero(as_tuple=True)
            b = torch.floor(flat[t, c].double() / self.hist_w[c]).long()  # exact: the width is a power of 2
            self.hist.view(-1).index_add_(0, c * HIST_BINS + b, torch.ones_like(b))

    # ------------------------------------------------------------------ result
    def result(self, hookpoint: str = "", tokenizer=None, metadata: dict[str, Any] | None = None) -> ContextCollection:
        if self.n_tokens == 0:
            raise ConfigError("no tokens to read: every position was padding or a special token")
        gen = torch.Generator().manual_seed(self.seed + 1)
        out: dict[int, LatentContexts] = {}
        for c, latent in enumerate(self.latents):
            n_fired = int(self.fired_all[latent])
            top = self.top.contexts(c)
            bins: list[list[Context]] = [[] for _ in range(self.n_bins)]
            edges: list[float] = []
            slots = torch.isfinite(self.res.key[:, c]).nonzero().flatten() if self.res.size else torch.zeros(0)
            if len(slots) >= max(self.n_bins, 1):
                values = self.res.value[slots, c]
                order = slots[torch.sort(values, stable=True).indices]  # reservoir slots, lowest value first
                groups = _equal_count_split(order.tolist(), self.n_bins)
                picks = [[g[i] for i in torch.randperm(len(g), generator=gen)[: self.per_bin].tolist()] for g in groups]
                made = iter(self.res.contexts(c, sum(picks, [])))  # one call per latent: fewer small ops
                for b, pick in enumerate(picks):
                    bins[b] = sorted((next(made) for _ in pick), key=lambda x: -x.value)
                firsts = torch.tensor([g[0] for g in groups] + [order[-1]])
                edges = _short(self.res.value[firsts, c])
            out[latent] = LatentContexts(
                latent=latent,
                n_tokens=self.n_tokens,
                n_fired=n_fired,
                density=n_fired / self.n_tokens,
                max_value=float(self.max_all[latent]),
                top=top,
                quantiles=bins,
                quantile_edges=edges,
                value_histogram=self._histogram(c),
            )
        ids_seen = {t for lc in out.values() for c in lc.top + sum(lc.quantiles, []) for t in c.token_ids}
        ids_seen.update(t for row in self.rand_ids.tolist() for t in row if t >= 0)
        tokens = {i: tokenizer.decode([i]) for i in sorted(ids_seen)} if tokenizer is not None else {}
        keep_r = torch.isfinite(self.rand_key)
        return ContextCollection(
            hookpoint=hookpoint,
            d_sae=self.d_sae,
            n_tokens=self.n_tokens,
            n_rows=self.n_rows,
            window=self.window,
            before=self.before,
            latents=out,
            density=(self.fired_all.double() / self.n_tokens).tolist(),
            max_values=self.max_all.tolist(),
            random_windows=[[t for t in row if t >= 0] for row in self.rand_ids[keep_r].tolist()],
            random_fired=[self.cols[f].tolist() for f in self.rand_fired[keep_r]],
            tokenizer_name=getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
            tokens=tokens,
            metadata={
                "top_k": self.top_k,
                "n_bins": self.n_bins,
                "per_bin": self.per_bin,
                "reservoir": self.reservoir,
                "seed": self.seed,
                **(metadata or {}),
            },
        )

    def _histogram(self, c: int) -> Histogram:
        w, counts = float(self.hist_w[c]), self.hist[c]
        if w == 0:
            return Histogram(edges=[], counts=[])
        n = int(counts.nonzero().max()) + 1
        return Histogram(edges=[w * i for i in range(n + 1)], counts=counts[:n].tolist())


_POW10 = torch.tensor([10.0**i for i in range(23)], dtype=torch.float64)  # exact doubles


def _short(values: torch.Tensor) -> list:
    """Values (any shape) rounded to 7 significant digits, about float32's precision, so JSON
    stays small and a value reads the same wherever it is shown. Dividing the rounded integer by
    an exact power of ten gives the double nearest the decimal, which prints as that decimal."""
    v = values.double()
    k = (6 - torch.floor(torch.log10(v.abs().clamp_min(1e-300)))).long()  # decimals to keep
    up = _POW10[k.clamp(0, 22)]
    down = _POW10[(-k).clamp(0, 22)]
    out = torch.where(k >= 0, torch.round(v * up) / up, torch.round(v / down) * down)
    return torch.where(v == 0, 0.0, out).tolist()


def _equal_count_split(items: list, n: int) -> list[list]:
    """`items` (sorted) cut into `n` consecutive groups whose sizes differ by at most one."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for b in range(n):
        stop = start + size + (b < extra)
        out.append(items[start:stop])
        start = stop
    return out


class _Windows:
    """Cuts windows out of one batch: token ids (-1 outside the row or on padding) and values."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, F: torch.Tensor, before: int, width: int):
        self.ids, self.mask, self.F, self.T = ids, mask, F, ids.shape[1]
        self.offsets = torch.arange(width) - before

    def _index(self, rows: torch.Tensor, pos: torch.Tensor):
        P = pos[:, None] + self.offsets
        inside = (P >= 0) & (P < self.T)
        Pc = P.clamp(0, self.T - 1)
        valid = inside & self.mask[rows[:, None], Pc]
        return Pc, valid

    def one_latent(self, rows: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor):
        Pc, valid = self._index(rows, pos)
        ids = torch.where(valid, self.ids[rows[:, None], Pc], -1)
        vals = torch.where(valid, self.F[rows[:, None], Pc, cols[:, None]], 0.0)
        return ids, vals

    def all_latents(self, rows: torch.Tensor, pos: torch.Tensor):
        Pc, valid = self._index(rows, pos)
        ids = torch.where(valid, self.ids[rows[:, None], Pc], -1)
        vals = torch.where(valid[..., None], self.F[rows[:, None], Pc], 0.0)  # [m, width, n]
        return ids, vals


class _Slots:
    """`size` kept windows per latent, ranked by a score: top-k (largest peaks first) or the
    reservoir (smallest random keys). A slot whose score is not finite is empty."""

    def __init__(self, size: int, n: int, width: int, before: int):
        self.size, self.before = size, before
        self.key = torch.full((size, n), math.nan)
        self.value = torch.zeros(size, n)
        self.doc = torch.full((size, n), -1, dtype=torch.int64)
        self.pos = torch.zeros(size, n, dtype=torch.int64)
        self.ids = torch.full((size, n, width), -1, dtype=torch.int64)
        self.vals = torch.zeros(size, n, width)

    def merge(self, cand, locate, windows: _Windows, row0: int, descending: bool, value=None) -> None:
        """Merge candidate scores `cand [m, n]` (±inf: no candidate) into the slots.

        `locate(i, c)` gives the (row in the batch, position) of candidates i of latent columns c,
        `value[i, c]` their activation (default: the score itself).
        """
        if not self.size:
            return
        empty = -math.inf if descending else math.inf
        old_key = torch.where(torch.isfinite(self.key), self.key, empty)
        allk = torch.cat([old_key, cand])
        if descending:  # top-k: on ties the earlier entry (old slots, then earlier rows) wins
            order = torch.sort(allk, dim=0, descending=True, stable=True).indices[: self.size]
        else:  # reservoir keys are i.i.d. uniform: no ties worth ordering
            order = allk.topk(self.size, dim=0, largest=False).indices
        new_key = allk.gather(0, order)
        src = order.clamp(max=self.size - 1)

        def take(a: torch.Tensor) -> torch.Tensor:
            return a.gather(0, src if a.dim() == 2 else src[..., None].expand(-1, -1, a.shape[2]))

        val, doc, pos, ids, vals = (take(a) for a in (self.value, self.doc, self.pos, self.ids, self.vals))
        s, c = ((order >= self.size) & torch.isfinite(new_key)).nonzero(as_tuple=True)
        if s.numel():
            i = order[s, c] - self.size
            r, p = locate(i, c)
            val[s, c] = (value if value is not None else cand)[i, c].float()
            doc[s, c] = row0 + r
            pos[s, c] = p
            ids[s, c], vals[s, c] = windows.one_latent(r, p, c)
        self.key, self.value, self.doc, self.pos, self.ids, self.vals = new_key, val, doc, pos, ids, vals

    def contexts(self, c: int, slots: list[int] | None = None) -> list[Context]:
        """Latent column c's windows in `slots` (default: every filled slot, best score first)."""
        if slots is None:
            slots = torch.isfinite(self.key[:, c]).nonzero().flatten().tolist()
        if not slots:
            return []
        sel = torch.tensor(slots)
        ids, ok = self.ids[sel, c], self.ids[sel, c] >= 0
        vals = _short(self.vals[sel, c])
        lead = ok[:, : self.before].sum(1).tolist()  # invalid entries before the chosen token are dropped
        out = []
        for j, (row, keep, v) in enumerate(zip(ids.tolist(), ok.tolist(), vals)):
            out.append(
                Context(
                    token_ids=[t for t, k in zip(row, keep) if k],
                    values=[x for x, k in zip(v, keep) if k],
                    doc=int(self.doc[slots[j], c]),
                    position=int(self.pos[slots[j], c]),
                    offset=lead[j],
                )
            )
        return out
