"""A disk cache of harvested activations: sharded safetensors plus a JSON manifest.

Harvest a model once, train many SAEs (or rerun evaluations) from disk. Layout of a cache folder:

    manifest.json            model, hookpoints (with widths), dtype, context size, data position,
                             total tokens and, per shard, its file, token count, byte size, sha256
    shard_00000.safetensors  one tensor per hookpoint [n, d] and `tokens` [n] (int32 ids)

Writing is atomic per shard (temp file + rename, then the manifest is rewritten atomically), so
a killed harvest leaves only complete shards listed; `write_cache` called again continues from
the recorded text position. Reading checks each shard's size and checksum as it is opened and
names the shard that is truncated or corrupt; `CachedSource` refuses a cache whose model or
hookpoint differs from the one asked for. Shards hold tokens in document order; the reader
shuffles within a shard and visits shards in a per-epoch random order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, StrictStr, StringConstraints, ValidationError
from safetensors import SafetensorError, safe_open

from saelab.activations.base import Batch
from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors

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

    hookpoints: dict[Annotated[str, StringConstraints(pattern=r"^\S+$")], PositiveInt]  # module paths
    shards: list[_Shard]
    rows_state: dict
    total_tokens: NonNegativeInt = 0
    complete: bool = False


def _identity(source, dtype: str, data_desc: Any) -> dict[str, Any]:
    """What must match for a cache to be continued or reused."""
    return {
        "model": source.model_name,
        "hookpoints": {hp.name: width for hp, width in source.cache_widths().items()},
        "dtype": dtype,
        "context_size": source.rows.context_size,
        "packing": source.rows.packing,
        "exclude_special": source.specials is not None,
        "data": data_desc,
    }


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

    `source` is a `saelab.models.Harvester` (or a ModelSource: its hookpoint and target). Stops after
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
    hookpoints = list(source.cache_widths())
    parts: list[dict[str, torch.Tensor]] = []
    pending = 0
    torch_dtype = _DTYPES[dtype]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, initial=manifest["total_tokens"], unit="tok", desc="harvest", leave=False)

    def flush() -> None:
        nonlocal parts, pending
        if not parts:
            return
        tensors = {hp.name: torch.cat([p[hp.name] for p in parts]).to(torch_dtype) for hp in hookpoints}
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


class CachedSource:
    """Stream one hookpoint's activations (and token ids) from a cache, shuffled, resumable.

    Memory is one shard. Shard order is shuffled per epoch and rows within a shard per
    (seed, epoch, shard), so the state is just (epoch, shard index, batches taken from it).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        hookpoint: str | None = None,
        batch_size: int = 1024,
        *,
        target_hookpoint: str | None = None,
        model: str | None = None,
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
        if hookpoint is None:
            if len(widths) != 1:
                raise ConfigError(f"{self.dir} holds hookpoints {list(widths)}; choose one with `hookpoint`")
            hookpoint = next(iter(widths))
        for hp in (hookpoint, target_hookpoint):
            if hp is not None and hp not in widths:
                raise ConfigError(
                    f"{self.dir} has no hookpoint '{hp}' (model {self.manifest['model']}); it holds {list(widths)}"
                )
        if not self.manifest["shards"]:
            raise FileFormatError(f"{self.dir} holds no shards; the harvest wrote nothing")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive (got {batch_size})")
        self.hookpoint, self.target = hookpoint, target_hookpoint
        self.d_in = int(widths[hookpoint])
        self.batch_size, self.shuffle, self.repeat, self.seed, self.verify = batch_size, shuffle, repeat, seed, verify
        self.epoch, self.shard_pos, self.taken, self.position = 0, 0, 0, 0
        self._data: dict[str, torch.Tensor] | None = None
        self._verified: set[str] = set()

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
        names = [self.hookpoint, "tokens"] + ([self.target] if self.target else [])
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
        d = self._data
        return Batch(
            x=d[self.hookpoint][sl].float(),
            tokens=d["tokens"][sl].long(),
            target=d[self.target][sl].float() if self.target else None,
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
    `cache_tokens` caps the harvest (default: the whole dataset once).
    """
    from saelab.models.source import harvester_from_spec

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
    manifest = read_manifest(cache_dir) if (cache_dir / MANIFEST).exists() else None
    finished = manifest is not None and (
        manifest["complete"] or (max_tokens and manifest["total_tokens"] >= max_tokens)
    )
    if finished:
        names = list(manifest["hookpoints"])
        hookpoint = _match(names, spec["hookpoint"], cache_dir)
        target = _match(names, spec["target_hookpoint"], cache_dir) if spec.get("target_hookpoint") else None
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
        hookpoint = harvester.hookpoints[0].name
        target = harvester.hookpoints[-1].name if spec.get("target_hookpoint") else None
    return CachedSource(cache_dir, hookpoint, target_hookpoint=target, model=spec["model"], **reader)


def _match(names: list[str], pattern: str, cache_dir: Path) -> str:
    import fnmatch

    hits = [n for n in names if n == pattern] or [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if len(hits) != 1:
        raise ConfigError(f"{cache_dir} holds hookpoints {names}; '{pattern}' matches {len(hits)} of them")
    return hits[0]


def cache_from_spec(spec: dict[str, Any]) -> CachedSource:
    """A `source: {type: cache, path: DIR, hookpoint: ...}` config."""
    allowed = {"path", "hookpoint", "target_hookpoint", "batch_size", "model", "shuffle", "repeat", "seed", "verify"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in cache source; valid keys: {sorted(allowed)}")
    if "path" not in spec:
        raise ConfigError("a cache source needs `path`, the folder `saelab harvest` wrote")
    spec = dict(spec)
    return CachedSource(spec.pop("path"), spec.pop("hookpoint", None), int(spec.pop("batch_size", 1024)), **spec)
