"""saelab's dictionary layout: any saelab dictionary, including those the SAELens layout cannot hold
(crosscoders and cross-layer transcoders, which read or write several sites; TopK transcoders).

A folder holds two files, each written atomically:

`dictionary.json`
    {
      "format": "saelab-dictionary", "format_version": 1,
      "kind": "sae" | "transcoder" | "crosscoder" | "cross_layer_transcoder",
      "architecture": "batchtopk", "d_sae": 4096,
      "reads":  [{"site": "model.layers.3", "width": 512}, {"site": "model.layers.4", "width": 512}],
      "writes": [{"site": "model.layers.3", "width": 512}, {"site": "model.layers.4", "width": 512}],
      "tensors": {"W_enc": [1024, 4096], "b_enc": [4096], "W_dec": [4096, 1024], ...},
      "config": {... saelab's full SAE config ...},
      "saelab_version": "...", "provenance": {...}, "metadata": {...}
    }
  `reads` lists, in order, every site the encoder reads (a module path, or `model:path` for several
  models) and its width; `writes` the sites the decoder writes. The encoder's input is the reads'
  activations concatenated in that order, the decoder's output the writes' concatenation.
`sparsity.safetensors` (optional)
    `sparsity`: log10 firing frequency per latent, as in the SAELens layout.
`dictionary.safetensors`
    the dictionary's parameters and buffers under saelab's own names, so a load gives back exactly
    what was saved: `W_enc [sum of read widths, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, sum of
    write widths]`, `b_dec [sum of write widths]` (the SAELens orientation), a transcoder's `b_in
    [d_in]` and `W_skip [d_out, d_in]`, and the architecture's own (JumpReLU's `log_threshold`,
    BatchTopK's scalar `threshold`, ...).

A cross-layer transcoder (`clt_topk`, `clt_jumprelu`: one MLP input read and one MLP output written
per layer, in layer order) is described the same way, with `"kind": "cross_layer_transcoder"`; its
tensors are `W_enc [L, d, F]`, one `W_dec_l [F, L - l, d_out]` per source layer, and flat `b_enc
[L*F]`, `b_in [L*d]`, `b_dec [L*d_out]` (see saelab.sae.clt). A cross-layer file of another
architecture is refused by name.

`load` checks the JSON's types, that every site is named and the widths add up to the config's, and
every tensor's name and shape, before building anything; a bad file fails naming the file and what
is wrong. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import saelab
from saelab.errors import ConfigError, FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.io.formats.base import read_safetensors
from saelab.io.saelens import write_sparsity
from saelab.sae.base import SAE
from saelab.sae.registry import get_class, list_architectures, make_config

CONFIG_FILE = "dictionary.json"
WEIGHTS_FILE = "dictionary.safetensors"
FORMAT_NAME = "saelab-dictionary"
FORMAT_VERSION = 1
FILES = (CONFIG_FILE, WEIGHTS_FILE)


# ------------------------------------------------------------------------------------ sites


def _split(total: int, sites: list[str] | None) -> list[dict[str, Any]]:
    """Each of `sites` with its width: saelab's multi-site dictionaries split `total` equally."""
    sites = sites or [None]
    return [{"site": s, "width": total // len(sites)} for s in sites]


def site_layout(sae: SAE) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(reads, writes) of a saelab dictionary: each site with its width, in concatenation order."""
    cfg = sae.cfg
    return _split(cfg.d_in, cfg.read_sites), _split(cfg.output_width, cfg.write_sites)


def kind(reads: list[dict[str, Any]], writes: list[dict[str, Any]]) -> str:
    """sae, transcoder, crosscoder or cross_layer_transcoder, from the sites read and written."""
    read_sites, write_sites = [r["site"] for r in reads], [w["site"] for w in writes]
    if len(reads) == 1 and len(writes) == 1:
        return "sae" if read_sites == write_sites else "transcoder"
    return "crosscoder" if read_sites == write_sites else "cross_layer_transcoder"


# ------------------------------------------------------------------------------------ save


def save(
    sae: SAE, path: str | Path, sparsity: torch.Tensor | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `sae` to folder `path` in saelab's dictionary layout (module docstring). `sparsity`:
    per-latent firing frequency, written as `sparsity.safetensors` as in the SAELens layout."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"{path} exists and is not a folder; choose a folder path for the dictionary")
    reads, writes = site_layout(sae)
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous() for k, v in sae.state_dict().items()
    }
    cfg: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind(reads, writes),
        "architecture": sae.architecture,
        "d_sae": sae.cfg.d_sae,
        "reads": reads,
        "writes": writes,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "config": sae.cfg.model_dump(),
        "saelab_version": saelab.__version__,
    }
    if getattr(sae, "provenance", None):
        cfg["provenance"] = sae.provenance
    if metadata:
        cfg["metadata"] = metadata
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, tensors)
    write_sparsity(path, sparsity, sae.cfg.d_sae)
    write_json(path / CONFIG_FILE, cfg)  # last: a folder with a config has its weights
    return path


# ------------------------------------------------------------------------------------ load


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read_metadata(folder: Path) -> dict[str, Any]:
    """The `metadata` object of a saved dictionary ({} when it has none)."""
    path = folder / CONFIG_FILE
    cfg = read_json(path, "the file may be truncated")
    metadata = cfg.get("metadata") if isinstance(cfg, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _fail(path: Path, problem: str) -> FileFormatError:
    return FileFormatError(f"{path}: {problem}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _entries(cfg: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    entries = cfg.get(key)
    if not isinstance(entries, list) or not entries:
        raise _fail(path, f'\'{key}\' must be a non-empty list of {{"site": ..., "width": ...}} (got {entries!r:.80})')
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} must be an object with 'site' and 'width' (got {entry!r:.60})")
        if "site" not in entry:
            raise _fail(path, f"{where} has no 'site': every site read or written must be named")
        site = entry["site"]
        if site is None and len(entries) > 1:
            raise _fail(path, f"{where} has site null; a dictionary of several sites must name each of them")
        if site is not None and (not isinstance(site, str) or not site.strip() or site != site.strip()):
            raise _fail(path, f"{where}: 'site' must be a module path such as 'model.layers.3' (got {site!r:.60})")
        if site in seen:
            raise _fail(path, f"{where}: site {site!r} is listed twice in '{key}'")
        if site is not None:
            seen.add(site)
        if not _positive_int(entry.get("width")):
            raise _fail(path, f"{where} ({site}): 'width' must be a positive integer (got {entry.get('width')!r:.40})")
    return entries


def _config_values(cfg: dict[str, Any], reads: list, writes: list, path: Path) -> dict[str, Any]:
    """saelab config values, after checking that the config agrees with the sites and widths listed."""
    values = cfg.get("config")
    if not isinstance(values, dict):
        raise _fail(path, f"'config' must be an object holding the saelab SAE config (got {values!r:.60})")
    values = dict(values)
    if values.get("architecture") != cfg["architecture"]:
        raise _fail(
            path,
            f"'architecture' is {cfg['architecture']!r} but config.architecture is "
            f"{values.get('architecture')!r}; they must agree",
        )
    read_sites, write_sites = [r["site"] for r in reads], [w["site"] for w in writes]
    found = kind(reads, writes)
    cross_layer = get_class(cfg["architecture"]).needs_sites  # a CLT class (of one layer too)
    if found == "cross_layer_transcoder" and not cross_layer:
        clts = ", ".join(a for a in list_architectures() if get_class(a).needs_sites)
        raise _fail(
            path,
            f"a cross-layer transcoder (reads {read_sites}, writes {write_sites}) but '{cfg['architecture']}' is "
            f"not a cross-layer architecture ({clts} are)",
        )
    for key, entries in (("reads", reads), ("writes", writes)):
        if len({e["width"] for e in entries}) > 1:
            widths = [e["width"] for e in entries]
            raise _fail(path, f"'{key}' has widths {widths}; saelab's multi-site dictionaries have sites of one width")
    d_in, d_out = sum(r["width"] for r in reads), sum(w["width"] for w in writes)
    have_in, have_out = values.get("d_in"), values.get("d_out") or values.get("d_in")
    if have_in != d_in:
        raise _fail(path, f"config.d_in is {have_in!r} but the widths in 'reads' add up to {d_in}")
    if have_out != d_out:
        raise _fail(path, f"config's output width is {have_out!r} but the widths in 'writes' add up to {d_out}")
    site = read_sites[0] if len(read_sites) == 1 and not cross_layer else read_sites
    write_site = write_sites if cross_layer else write_sites[0] if found == "transcoder" else None
    for key, want, listed in (("site", site, "reads"), ("write_site", write_site, "writes")):
        if values.get(key) != want:
            raise _fail(path, f"config.{key} is {values.get(key)!r} but '{listed}' says {want!r}")
    return values


def load(path: str | Path, device: str = "cpu") -> SAE:
    """Read a folder written by `save`; every name, width and shape is checked first."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileFormatError(
            f"{cfg_path} is missing; a saelab dictionary folder needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    cfg = read_json(cfg_path, "the file may be truncated")
    if not isinstance(cfg, dict):
        raise _fail(cfg_path, "must hold a JSON object")
    if cfg.get("format") != FORMAT_NAME:
        raise _fail(cfg_path, f"'format' must be {FORMAT_NAME!r} (got {cfg.get('format')!r:.40})")
    version = cfg.get("format_version")
    if not _positive_int(version) or version > FORMAT_VERSION:
        raise _fail(
            cfg_path,
            f"format_version {version!r} is not one this saelab reads (up to {FORMAT_VERSION}); upgrade saelab",
        )
    if not isinstance(cfg.get("architecture"), str):
        raise _fail(cfg_path, f"'architecture' must name a saelab architecture (got {cfg.get('architecture')!r:.40})")
    try:
        get_class(cfg["architecture"])
    except ConfigError as exc:
        raise _fail(cfg_path, str(exc)) from None
    if not _positive_int(cfg.get("d_sae")):
        raise _fail(cfg_path, f"'d_sae' must be a positive integer (got {cfg.get('d_sae')!r:.40})")
    reads, writes = _entries(cfg, "reads", cfg_path), _entries(cfg, "writes", cfg_path)
    values = _config_values(cfg, reads, writes, cfg_path)
    if values.get("d_sae") != cfg["d_sae"]:
        raise _fail(cfg_path, f"'d_sae' is {cfg['d_sae']} but config.d_sae is {values.get('d_sae')!r}")
    try:
        sae_cfg = make_config(values)
    except ConfigError as exc:
        raise _fail(cfg_path, f"'config' is not a valid saelab config ({exc})") from None
    sae = get_class(sae_cfg.architecture)(sae_cfg)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileFormatError(f"{weights_path} is missing; the dictionary folder is incomplete")
    tensors = read_safetensors(weights_path)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise _fail(
            weights_path, f"does not match a '{sae_cfg.architecture}' dictionary: missing {missing}, unexpected {extra}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise _fail(
                weights_path,
                f"'{key}' has shape {tuple(tensors[key].shape)} but {CONFIG_FILE} (reads "
                f"{[r['width'] for r in reads]}, writes {[w['width'] for w in writes]}, d_sae={cfg['d_sae']}) "
                f"implies {shape}",
            )
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise _fail(weights_path, f"'{key}' contains NaN or Inf; the dictionary is broken")
    sae.load_state_dict(tensors)
    earlier = cfg.get("provenance") if isinstance(cfg.get("provenance"), dict) else {}
    sae.provenance = {
        **{k: v for k, v in earlier.items() if k not in ("source_format", "source_path")},
        "source_format": "saelab-dictionary",
        "source_path": str(path),
        "reads": [r["site"] for r in reads],
        "writes": [w["site"] for w in writes],
    }
    if earlier.get("source_format") not in (None, "saelab-dictionary"):
        sae.provenance["converted_from"] = {"format": earlier.get("source_format"), "path": earlier.get("source_path")}
    return sae.to(device).eval()
