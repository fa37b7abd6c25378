"""A disk cache of harvested activations: sharded safetensors plus a JSON manifest.

Harvest a model once, train many SAEs (or rerun evaluations) from disk. Layout of a cache folder:

    manifest.json            model, hookpoints (with widths), dtype, context size, data position,
                             total tokens and, per shard, its file, token count, byte size, sha256
    shard_00000.safetensors  one tensor per site [n, d] and `tokens` [n] (int32 ids)

A cache harvested from several models (a Harvester given {alias: model}) stores each site under
`alias/hookpoint` (`ft/model.layers.2`) and records `models: {alias: model}` in the manifest; the
rows of every site are the same tokens, in the same order.

Writing is atomic per shard (temp file + rename, then the manifest is rewritten atomically), so
a killed harvest leaves only complete shards listed; `write_cache` called again continues from
the recorded text position. Reading checks each shard's size and checksum as it is opened and
names the shard that is truncated or corrupt; `CachedSource` refuses a cache whose model or
hookpoint differs from the one asked for. Shards hold tokens in document order; the reader
shuffles within a shard (one permutation for every site) and visits shards in a per-epoch random order.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, StrictStr, StringConstraints, ValidationError
from safetensors import SafetensorError, safe_open

from saelab.activations.base import Batch
from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.models import hooks

MANIFEST = "manifest.json"
FORMAT = "saelab-activation-cache/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileFormatError(
            f"{cache_dir} is not an activation cache: {MANIFEST} is missing; write one with `saelab harvest`"
        )
    manifest = read_json(path, "the cache is damaged, harvest it again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FileFormatError(f"{path} has format {found!r}, expected {FORMAT!r}")
    missing = [k for k in ("shards", "rows_state") if k not in manifest]
    shards = manifest.get("shards", [])
    bad_shards = (
        [i for i, sh in enumerate(shards) if not isinstance(sh, dict) or "bytes" not in sh]
        if isinstance(shards, list)
        else ["shards is not a list"]
    )
    if missing or bad_shards:
        raise FileFormatError(
            f"{path} is incomplete (missing keys {missing}, malformed shard entries {bad_shards}); harvest it again"
        )
    try:
        _ManifestTypes.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise FileFormatError(
            f"{path}: {where!r} {err['msg'].lower()} (got {err.get('input')!r}); the cache is damaged, harvest it again"
        ) from None
    return manifest


class _Shard(BaseModel):
    file: StrictStr
    tokens: NonNegativeInt
    bytes: NonNegativeInt
    sha256: StrictStr | None = None


class _ManifestTypes(BaseModel):
    """The types every reader of a manifest relies on (extra keys are the harvester's own)."""

    model_config = ConfigDict(strict=True)

    hookpoints: dict[Annotated[str, StringConstraints(pattern=r"^\S+$")], PositiveInt]  # site names
    models: dict[str, str] | None = None  # alias -> model, for a cache of several models
    shards: list[_Shard]
    rows_state: dict
    total_tokens: NonNegativeInt = 0
    complete: bool = False


def _identity(source, dtype: str, data_desc: Any) -> dict[str, Any]:
    """What must match for a cache to be continued or reused."""
    ident = {
        "model": source.model_name,
        "hookpoints": dict(source.site_widths),
        "dtype": dtype,
        "context_size": source.rows.context_size,
        "packing": source.rows.packing,
        "exclude_special": source.specials is not None,
        "data": data_desc,
    }
    if "" not in source.models:  # several models: record which model each alias is
        ident["models"] = dict(source.model_names)
    return ident


def write_cache(
    source,
    cache_dir: str | Path,
    max_tokens: int | None = None,
    shard_tokens: int = 262_144,
    dtype: str = "float32",
    data_desc: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run `source`'s model over its text in order and write every hookpoint to `cache_dir`.

    `source` is a `saelab.models.Harvester` (or a ModelSource: its sites). Stops after
    `max_tokens` kept tokens (None: the whole dataset, once). Resumes a partial cache with the
    same identity; a cache written by another model/hookpoint/settings raises ConfigError.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"cache dtype must be one of {sorted(_DTYPES)} (got {dtype!r})")
    source = getattr(source, "harvester", source)  # a ModelSource harvests through its Harvester
    cache_dir = Path(cache_dir)
    ident = _identity(source, dtype, data_desc)
    rows = source.rows
    if (cache_dir / MANIFEST).exists():
        manifest = read_manifest(cache_dir)
        old = {k: manifest.get(k) for k in ident}
        if old != json.loads(json.dumps(ident)):
            diff = [k for k in ident if old[k] != json.loads(json.dumps(ident[k]))]
            raise ConfigError(
                f"{cache_dir} holds a cache with different {', '.join(diff)} "
                f"({', '.join(f'{k}={old[k]!r}' for k in diff)}); use another folder or delete it"
            )
        for shard in manifest["shards"]:
            _check_shard(cache_dir, shard)
        rows.load_state_dict({k: torch.tensor(v, dtype=torch.int64) for k, v in manifest["rows_state"].items()})
    else:
        manifest = {"format": FORMAT, **ident, "shards": [], "total_tokens": 0, "complete": False}
    if manifest.get("complete") or (max_tokens is not None and manifest["total_tokens"] >= max_tokens):
        return manifest
    sites = list(source.site_widths)
    parts: list[dict[str, torch.Tensor]] = []
    pending = 0
    torch_dtype = _DTYPES[dtype]
    bar = None
    if progress:
        from saelab.progress import bar as progress_bar

        bar = progress_bar(total=max_tokens, initial=manifest["total_tokens"], unit="tok", desc="harvest")

    def flush() -> None:
        nonlocal parts, pending
        if not parts:
            return
        tensors = {site: torch.cat([p[site] for p in parts]).to(torch_dtype) for site in sites}
        tensors["tokens"] = torch.cat([p["tokens"] for p in parts]).to(torch.int32)
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        write_safetensors(cache_dir / name, tensors)
        path = cache_dir / name
        manifest["shards"].append(
            {
                "file": name,
                "tokens": int(tensors["tokens"].numel()),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        manifest["total_tokens"] += int(tensors["tokens"].numel())
        manifest["rows_state"] = {k: v.tolist() for k, v in rows.state_dict().items()}
        write_json(cache_dir / MANIFEST, manifest)
        parts, pending = [], 0

    done = False
    while not done:
        batch = rows.next_rows(source.model_batch_size)
        if batch is None:
            manifest["complete"] = True
            break
        part = source.harvest_rows(*batch)
        parts.append(part)
        n = int(part["tokens"].numel())
        pending += n
        if bar is not None:
            bar.update(n)
        done = max_tokens is not None and manifest["total_tokens"] + pending >= max_tokens
        if pending >= shard_tokens or done:
            flush()
    flush()
    write_json(cache_dir / MANIFEST, manifest)
    if bar is not None:
        bar.close()
    if manifest["total_tokens"] == 0:
        raise ConfigError("the harvest kept no tokens: every position was padding or a special token")
    return manifest


def _check_shard(cache_dir: Path, shard: dict[str, Any], verify_checksum: bool = True) -> Path:
    path = cache_dir / shard["file"]
    if not path.exists():
        raise FileFormatError(f"cache shard {path} is missing; the cache is incomplete, harvest again")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise FileFormatError(
            f"cache shard {path} is truncated or altered: {size} bytes, the manifest says {shard['bytes']}"
        )
    if verify_checksum and sha256_file(path) != shard["sha256"]:
        raise FileFormatError(f"cache shard {path} is corrupt: its sha256 does not match the manifest")
    return path


def _site_matches(name: str, pattern: str) -> bool:
    """Whether the cache site `name` is one `pattern` asks for: globs in the module path as in
    `hooks.resolve`, the `:input` suffix exact, and a pattern without `alias/` matching every model."""
    alias, hookpoint = hooks.split_site(name)
    want_alias, want = hooks.split_site(pattern)
    if want_alias and not fnmatch.fnmatchcase(alias, want_alias):
        return False
    want_path, want_io = hooks.parse(want)
    try:
        path, io = hooks.parse(hookpoint)
    except ConfigError:  # a name no harvest writes: it is simply not what was asked for
        return False
    if io != want_io:
        return False
    if any(c in want_path for c in "*?["):
        return bool(hooks.glob_regex(want_path).match(path))
    return path == want_path


def select_sites(names: list[str], patterns: list[str]) -> dict[str, list[str]]:
    """{pattern: the sites of `names` it selects}, each in the cache's order."""
    return {p: [p] if p in names else [n for n in names if _site_matches(n, p)] for p in patterns}


class CachedSource:
    """Stream one or several sites' activations (and token ids) from a cache, shuffled, resumable.

    `hookpoint` reads one hookpoint (in every model of a several-model cache); `hookpoints` several
    (globs allowed; `alias/hookpoint` names one model's). Every batch carries `sites` for all of them,
    `x` the first and `target` the `target_hookpoint` site (default: x). Memory is one shard.
    Shard order is shuffled per epoch and rows within a shard per (seed, epoch, shard), with one
    permutation for every site, so the state is just (epoch, shard index, batches taken from it).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        hookpoint: str | None = None,
        batch_size: int = 1024,
        *,
        hookpoints: str | list[str] | None = None,
        target_hookpoint: str | None = None,
        model: str | None = None,
        models: dict[str, str] | None = None,
        shuffle: bool = True,
        repeat: bool = False,
        seed: int = 0,
        verify: bool = True,
    ):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        widths = self.manifest["hookpoints"]
        if model is not None and model != self.manifest["model"]:
            raise ConfigError(f"{self.dir} was harvested from model '{self.manifest['model']}', not '{model}'")
        if models is not None and dict(models) != self.manifest.get("models"):
            held = self.manifest.get("models") or self.manifest["model"]
            raise ConfigError(f"{self.dir} was harvested from models {held!r}, not {dict(models)!r}")
        self.site_names = self._sites(widths, hookpoint, hookpoints)
        self.target = None
        if target_hookpoint is not None:
            hits = select_sites(list(widths), [target_hookpoint])[target_hookpoint]
            if len(hits) != 1:
                self._refuse(target_hookpoint, widths, hits)
            self.target = hits[0]
            if self.target not in self.site_names:
                self.site_names.append(self.target)
        if not self.manifest["shards"]:
            raise FileFormatError(f"{self.dir} holds no shards; the harvest wrote nothing")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive (got {batch_size})")
        self.site_widths = {name: int(widths[name]) for name in self.site_names}
        self.hookpoint = self.x_site = self.site_names[0]
        self.target_site = self.target
        self.d_in = self.site_widths[self.x_site]
        self.d_out = self.site_widths[self.target] if self.target else None
        self.batch_size, self.shuffle, self.repeat, self.seed, self.verify = batch_size, shuffle, repeat, seed, verify
        self.epoch, self.shard_pos, self.taken, self.position = 0, 0, 0, 0
        self._data: dict[str, torch.Tensor] | None = None
        self._verified: set[str] = set()

    def _refuse(self, pattern: str, widths: dict[str, int], hits: list[str]) -> NoReturn:
        """`pattern` selects no site (`hits` empty) or several where one is needed."""
        models = self.manifest.get("models")
        held = f"models {models}" if models else f"model {self.manifest['model']}"
        if not hits:
            raise ConfigError(f"{self.dir} has no hookpoint '{pattern}' ({held}); it holds {list(widths)}")
        raise ConfigError(
            f"{self.dir}: '{pattern}' matches {len(hits)} sites ({', '.join(hits)}); name one, "
            "or read several with `hookpoints`"
        )

    def _sites(self, widths: dict[str, int], hookpoint: str | None, hookpoints: str | list[str] | None) -> list[str]:
        """The sites asked for, in order: models in the cache's order, then the patterns' order."""
        if hookpoint is not None and hookpoints is not None:
            raise ConfigError("give `hookpoint` (one site) or `hookpoints` (several), not both")
        if hookpoints is not None:
            patterns = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
            if not patterns:
                raise ConfigError(
                    f"hookpoints is empty; name at least one of the sites {self.dir} holds: {list(widths)}"
                )
        elif hookpoint is None:
            if len(widths) != 1:
                raise ConfigError(f"{self.dir} holds hookpoints {list(widths)}; choose one with `hookpoint`")
            patterns = list(widths)
        else:
            patterns = [hookpoint]
        chosen: list[str] = []
        for pattern, hits in select_sites(list(widths), patterns).items():
            if not hits:
                self._refuse(pattern, widths, hits)
            if hookpoints is None and len({hooks.split_site(h)[1] for h in hits}) != 1:
                self._refuse(pattern, widths, hits)  # `hookpoint` reads one hookpoint (in each model)
            chosen += [h for h in hits if h not in chosen]
        aliases = list(dict.fromkeys(hooks.split_site(n)[0] for n in widths))
        return sorted(chosen, key=lambda n: aliases.index(hooks.split_site(n)[0]))  # stable: pattern order kept

    def _order(self) -> list[int]:
        n = len(self.manifest["shards"])
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=gen).tolist()

    def _load(self) -> None:
        shard = self.manifest["shards"][self._order()[self.shard_pos]]
        path = _check_shard(self.dir, shard, self.verify and shard["file"] not in self._verified)
        self._verified.add(shard["file"])
        names = [*self.site_names, "tokens"]
        try:
            with safe_open(str(path), framework="pt") as f:
                data = {k: f.get_tensor(k) for k in names}
        except (SafetensorError, OSError, KeyError) as exc:
            raise FileFormatError(f"cache shard {path} cannot be read ({exc}); harvest again") from None
        n = data["tokens"].numel()
        if self.shuffle:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.shard_pos)
            perm = torch.randperm(n, generator=gen)
            data = {k: v[perm] for k, v in data.items()}
        self._data = data

    def __iter__(self) -> CachedSource:
        return self

    def __next__(self) -> Batch:
        while True:
            if self._data is None:
                if self.shard_pos >= len(self.manifest["shards"]):
                    if not self.repeat:
                        raise StopIteration
                    self.epoch, self.shard_pos, self.taken = self.epoch + 1, 0, 0
                self._load()
            n = self._data["tokens"].numel()
            if (self.taken + 1) * self.batch_size <= n:
                break
            self._data, self.shard_pos, self.taken = None, self.shard_pos + 1, 0  # drop the short tail
        sl = slice(self.taken * self.batch_size, (self.taken + 1) * self.batch_size)
        self.taken += 1
        self.position += 1
        sites = {name: self._data[name][sl].float() for name in self.site_names}
        return Batch(
            x=sites[self.x_site],
            tokens=self._data["tokens"][sl].long(),
            target=sites[self.target] if self.target else None,
            sites=sites,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: torch.tensor(getattr(self, k), dtype=torch.int64)
            for k in ("epoch", "shard_pos", "taken", "position", "seed")
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                f"the checkpoint was written with seed {int(state['seed'])}, this source has seed {self.seed}"
            )
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.taken, self.position = int(state["taken"]), int(state["position"])
        self._data = None
        if self.shard_pos < len(self.manifest["shards"]):
            self._load()


def cached_model_source(spec: dict[str, Any]) -> CachedSource:
    """A `type: model` source with `cache_dir`: harvest once (or continue), then read from disk.

    Several SAE runs (and the held-out evaluation) with the same cache_dir share one model pass.
    `cache_tokens` caps the harvest (default: the whole dataset once). With `hookpoints` or
    `models` every harvested site is read, as the live source would yield them.
    """
    from saelab.models.source import harvester_from_spec, model_specs

    spec = dict(spec)
    cache_dir = Path(spec.pop("cache_dir"))
    max_tokens = spec.pop("cache_tokens", None)
    shard_tokens = int(spec.pop("shard_tokens", 262_144))
    reader = {
        "batch_size": int(spec.pop("batch_size", 1024)),
        "seed": int(spec.pop("seed", 0)),
        "repeat": bool(spec.pop("repeat", False)),
    }
    spec.pop("buffer_tokens", None)
    models = None
    if spec.get("models") is not None:
        models = {alias: entry["model"] for alias, entry in model_specs(spec).items()}
    one_site = models is None and spec.get("hookpoints") is None  # the original one-hookpoint source
    manifest = read_manifest(cache_dir) if (cache_dir / MANIFEST).exists() else None
    finished = manifest is not None and (
        manifest["complete"] or (max_tokens and manifest["total_tokens"] >= max_tokens)
    )
    if finished and one_site:
        names = list(manifest["hookpoints"])
        hookpoint = _match(names, spec["hookpoint"], cache_dir)
        target = _match(names, spec["target_hookpoint"], cache_dir) if spec.get("target_hookpoint") else None
        select: dict[str, Any] = {"hookpoint": hookpoint, "target_hookpoint": target}
    elif finished:
        select = {k: spec.get(k) for k in ("hookpoint", "hookpoints", "target_hookpoint")}
    else:
        harvester = harvester_from_spec(spec)
        data = spec.get("data", "pydoc")
        write_cache(
            harvester,
            cache_dir,
            max_tokens,
            shard_tokens,
            data_desc=data if isinstance(data, (str, dict)) else "in-memory",
            progress=True,  # minutes of model forwards before training starts: show them
        )
        target = (
            hooks.resolve(harvester.model, spec["target_hookpoint"])[0].name if spec.get("target_hookpoint") else None
        )
        if one_site:
            select = {"hookpoint": harvester.hookpoints[0].name, "target_hookpoint": target}
        else:
            select = {"hookpoints": list(harvester.site_widths), "target_hookpoint": target}
    return CachedSource(cache_dir, model=spec.get("model"), models=models, **select, **reader)


def _match(names: list[str], pattern: str, cache_dir: Path) -> str:
    import fnmatch

    hits = [n for n in names if n == pattern] or [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if len(hits) != 1:
        raise ConfigError(f"{cache_dir} holds hookpoints {names}; '{pattern}' matches {len(hits)} of them")
    return hits[0]


def cache_from_spec(spec: dict[str, Any]) -> CachedSource:
    """A `source: {type: cache, path: DIR, hookpoint: ...}` config."""
    allowed = {
        "path",
        "hookpoint",
        "hookpoints",
        "target_hookpoint",
        "batch_size",
        "model",
        "models",
        "shuffle",
        "repeat",
        "seed",
        "verify",
    }
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in cache source; valid keys: {sorted(allowed)}")
    if "path" not in spec:
        raise ConfigError("a cache source needs `path`, the folder `saelab harvest` wrote")
    spec = dict(spec)
    return CachedSource(spec.pop("path"), spec.pop("hookpoint", None), int(spec.pop("batch_size", 1024)), **spec)
