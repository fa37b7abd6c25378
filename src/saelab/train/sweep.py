"""Many SAEs on one activation stream: a sweep trained in one process from one pass over the source.

Each step draws one batch (one model forward, for model sources) and scales it once; then every
member takes its own step through its own `Trainer`, with its own optimizer, schedules, latent
statistics, metrics log and checkpoints. A member therefore trains exactly as it would alone with
`saelab.train` on the same source, config and seed, because:

- the input scale, b_dec and `init_from_data` sample come from the same first batches (computed once);
- every member keeps its own copy of the global RNGs (torch, NumPy, Python), swapped in around all
  it does: some architectures draw from them while training (Matryoshka's `random_prefixes`), and
  alone a member would own that stream.

Layout: OUT/<name>/ is each member's trainer folder (metrics.jsonl, checkpoints/, without the source
position); OUT/source_checkpoints/ holds the shared source position once per checkpoint step; and
OUT/sweep.json names the newest step at which every member and the source were saved. It is
written last, so a run killed mid-save resumes from the previous complete step.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from saelab.activations.base import as_source
from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.sae.base import SAE
from saelab.train import checkpoint as ckpt
from saelab.train.trainer import TrainConfig, Trainer, TrainResult

# Training settings every member must share: they shape the one stream, its start and its checkpoints.
SHARED = frozenset(
    {
        "steps",
        "normalize_activations",
        "norm_estimation_batches",
        "b_dec_init",
        "device",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
    }
)
_SOURCE_DIR = "source_checkpoints"
_COMMIT = "sweep.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


class Sweep:
    """Train several SAEs of one `d_in` (any architectures and widths) on one source.

    `saes` is a list (member names default to `00_topk`, `01_relu`, ...) or a dict from name to
    member. A member is an SAE or a config dict; a config may also carry `name` (list form) and
    `train`, overrides of `train_config` for that member (any key but those in `SHARED`).
    """

    def __init__(
        self,
        saes: Sequence[SAE | dict] | Mapping[str, SAE | dict],
        data: Any,
        train_config: TrainConfig | dict | None = None,
        out_dir: str | Path | None = None,
    ):
        cfg = train_config if isinstance(train_config, TrainConfig) else TrainConfig.parse(train_config or {})
        members = _members(saes, cfg)
        d_ins = {m[1].cfg.d_in for m in members}
        if len(d_ins) > 1:
            widths = ", ".join(f"{name}: {sae.cfg.d_in}" for name, sae, _ in members)
            raise ConfigError(f"every SAE in a sweep reads the same activations, but their d_in differ ({widths})")
        self.source = as_source(data, d_ins.pop())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cfg = cfg
        self.trainers: dict[str, Trainer] = {}
        for name, sae, member_cfg in members:
            trainer = Trainer(sae, self.source, member_cfg, self.out_dir / name if self.out_dir else None)
            trainer.shares_source = True
            self.trainers[name] = trainer
        self._rng: dict[str, tuple] = {}

    @contextlib.contextmanager
    def _own_rng(self, name: str) -> Iterator[None]:
        ckpt.set_rng_state(*self._rng[name])
        try:
            yield
        finally:
            self._rng[name] = ckpt.rng_state()

    def fit(self, resume: bool = True) -> dict[str, TrainResult]:
        """Train every member to `steps`; results by name, input scale not yet folded (see train_many)."""
        lead = next(iter(self.trainers.values()))  # all members share the step count and batches
        committed = self._committed_step() if resume else None
        init = lead.data_init() if committed is None else None
        process_rng = ckpt.rng_state()  # what each member would find if it ran alone now
        for name, trainer in self.trainers.items():
            ckpt.set_rng_state(*process_rng)
            torch.manual_seed(trainer.cfg.seed)
            trainer.start(ckpt.step_path(trainer.out_dir, committed) if committed is not None else None, init)
            self._rng[name] = ckpt.rng_state()
        if committed is not None:
            try:
                position = load_file(str(self._source_file(committed)))
            except (OSError, ValueError) as exc:
                raise FileFormatError(
                    f"the sweep's source position is missing or truncated ({exc}); delete {self.out_dir} to start over"
                ) from None
            self.source.load_state_dict(position)
        bar = tqdm(
            total=self.cfg.steps,
            initial=lead.step,
            disable=None if self.cfg.progress else True,
            desc=f"sweep of {len(self.trainers)}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        while lead.step < self.cfg.steps:
            batch = lead._next_batch()  # the trainer's checks of each batch (shape, NaN/Inf)
            x = batch.x * lead.input_scale
            for name, trainer in self.trainers.items():
                with self._own_rng(name):
                    trainer.advance(batch, x)
            bar.update(1)
            if lead.checkpoint_due():
                committed = self._save(lead.step)
        bar.close()
        if self.out_dir is not None and committed != lead.step:
            self._save(lead.step)
        return {name: trainer.result() for name, trainer in self.trainers.items()}

    # ------------------------------------------------------------------ checkpoints
    def _source_file(self, step: int) -> Path:
        return self.out_dir / _SOURCE_DIR / f"{ckpt.step_name(step)}.safetensors"

    def _save(self, step: int) -> int:
        """Every member's checkpoint, then the source position, then the commit, then pruning."""
        for name, trainer in self.trainers.items():
            with self._own_rng(name):  # each checkpoint records its member's own RNG stream
                trainer.save_checkpoint()
        write_safetensors(self._source_file(step), self.source.state_dict())
        write_json(self.out_dir / _COMMIT, {"step": step, "members": list(self.trainers)})
        keep = self.cfg.keep_checkpoints
        for trainer in self.trainers.values():
            ckpt.prune(trainer.out_dir, keep)
        for old in sorted((self.out_dir / _SOURCE_DIR).glob("step_*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
        return step

    def _committed_step(self) -> int | None:
        path = self.out_dir / _COMMIT if self.out_dir is not None else None
        if path is None or not path.exists():
            return None
        state = read_json(path, f"delete {self.out_dir} to start over")
        try:
            step, members = int(state["step"]), list(state["members"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FileFormatError(f"{path} is unreadable ({exc}); delete {self.out_dir} to start over") from None
        if members != list(self.trainers):
            raise ConfigError(
                f"{self.out_dir} holds a sweep of {members}, not {list(self.trainers)}; resume with the same SAEs "
                "in the same order or use a new --out folder"
            )
        return step


def _members(
    saes: Sequence[SAE | dict] | Mapping[str, SAE | dict], cfg: TrainConfig
) -> list[tuple[str, SAE, TrainConfig]]:
    """(name, SAE, training config) for each member, with every input mistake named."""
    from saelab.sae.registry import create

    if isinstance(saes, (SAE, str)) or not isinstance(saes, (Sequence, Mapping)) or not saes:
        raise ConfigError("a sweep needs a non-empty list (or dict by name) of SAEs or SAE configs")
    named = isinstance(saes, Mapping)
    members, seen = [], {}
    for i, (key, entry) in enumerate(saes.items() if named else enumerate(saes)):
        where = f"saes[{key!r}]" if named else f"saes[{i}]"
        overrides: Any = {}
        if isinstance(entry, SAE):
            sae, name = entry, key if named else None
        elif isinstance(entry, Mapping):
            values = dict(entry)
            name, overrides = values.pop("name", None), values.pop("train", None) or {}
            name = key if named else name
            try:
                sae = create(values)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            raise ConfigError(f"{where} must be an SAE or a config mapping with at least `architecture`")
        name = f"{i:02d}_{sae.architecture}" if name is None else name
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == _SOURCE_DIR:
            raise ConfigError(
                f"{where}: name {name!r} must be a plain folder name (letters, digits, _ . = + -, not "
                f"starting with . or -) other than '{_SOURCE_DIR}'"
            )
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is already used by {seen[name]}; names must be unique")
        if any(sae is other for _, other, _ in members):
            raise ConfigError(f"{where} is the same SAE object as an earlier member; create one SAE per member")
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}: `train` must be a mapping of training settings for this SAE")
        shared = sorted(SHARED & set(overrides))
        if shared:
            raise ConfigError(
                f"{where}: {shared} cannot differ between SAEs of one sweep (shared: {', '.join(sorted(SHARED))}); "
                "set them in the sweep's `train` section"
            )
        try:
            member_cfg = TrainConfig.parse({**cfg.model_dump(), **overrides}) if overrides else cfg
        except ConfigError as exc:
            raise ConfigError(f"{where}: train: {exc}") from None
        seen[name] = where
        members.append((name, sae, member_cfg))
    return members


def train_many(
    saes: Sequence[SAE | dict] | Mapping[str, SAE | dict],
    data: Any,
    train_config: TrainConfig | dict | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, TrainResult]:
    """Train several SAEs from one pass over `data` (see `Sweep` for `saes`); each result is what
    `saelab.train` would return for that SAE alone, input scale folded in. Resumes from `out_dir`."""
    results = Sweep(saes, data, train_config, out_dir).fit()
    for result in results.values():
        result.sae.fold_input_scale(result.input_scale)
    return results
