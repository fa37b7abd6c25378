"""Save and load SAEs in the SAELens v6 on-disk layout, so they move between tools.

A folder holds `cfg.json` (SAELens keys plus saelab's own config under `metadata`),
`sae_weights.safetensors` (SAELens tensor names and orientation) and optionally
`sparsity.safetensors` (`sparsity`: log10 firing frequency per latent). Each file is written
atomically. Loading validates the key set and every shape before building the SAE, and never
unpickles anything.

Name mapping: saelab `relu` <-> SAELens `standard`; `batchtopk` is written as `jumprelu` with a
shared threshold (its inference form) and therefore loads back as a JumpReLU. SAELens' training
checkpoints of `batchtopk` and `matryoshka_batchtopk` (a scalar `topk_threshold`) load as saelab's
BatchTopK and Matryoshka with that threshold, which is what SAELens' own inference export computes.

Transcoders: SAELens' four transcoder classes (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
`jumprelu_skip_transcoder`) load as saelab ReLU / JumpReLU transcoders with their hooks as `site` and
`write_site`, and saelab transcoders are written as them; see saelab.io.saelens_transcoders for the
mapping (the input bias folded into b_enc) and what SAELens cannot hold.

Provenance: `sae.provenance` (source format, hookpoints, scalings folded in at load time) is written
under `metadata.saelab_provenance`, and its hookpoint as SAELens' `metadata.hook_name`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import saelab
from saelab.errors import ConfigError, FileFormatError
from saelab.io import saelens_transcoders
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.sae.base import SAE
from saelab.sae.registry import get_class, make_config

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)

_TO_SAELENS = {"relu": "standard"}
_FROM_SAELENS = {"standard": "relu", "matryoshka_batchtopk": "matryoshka"}
# SAELens cfg keys that change what encode computes; anything else is informational.
_SUPPORTED_NORMALIZATION = {"none", "expected_average_only_in"}


def save(
    sae: SAE, path: str | Path, sparsity: torch.Tensor | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `sae` to folder `path` in the SAELens v6 layout. `sparsity`: per-latent firing frequency."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"{path} exists and is not a folder; choose a folder path for the SAE")
    reads_several_sites(sae, refuse=True)
    architecture = sae.saved_architecture()
    tensors = {k: v.float() for k, v in sae.saved_state().items()}
    provenance = getattr(sae, "provenance", None)
    recorded: dict[str, Any] = {}
    if provenance:
        recorded["saelab_provenance"] = provenance
        if provenance.get("hook_name"):
            recorded["hook_name"] = provenance["hook_name"]
    transcoder = is_transcoder(sae)
    if transcoder:
        architecture = saelens_transcoders.saelens_architecture(architecture, sae.cfg.skip, sae.architecture)
        tensors = saelens_transcoders.state_for_file(tensors)
        unnamed = bool((provenance or {}).get("unnamed_hooks"))
        placeholders = (saelens_transcoders.PLACEHOLDER_IN, saelens_transcoders.PLACEHOLDER_OUT)
        for key, value in (("hook_name", sae.cfg.site), ("hook_name_out", sae.cfg.write_site)):
            if value and not (unnamed and value in placeholders):  # SAELens reads metadata.hook_name(_out)
                recorded[key] = value
    cfg: dict[str, Any] = {
        "architecture": _TO_SAELENS.get(architecture, architecture),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        **({"d_out": d_out(sae)} if transcoder else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False if transcoder else sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "saelab_version": saelab.__version__,
            "saelab_config": sae.cfg.model_dump(),
            **recorded,
            **(metadata or {}),
        },
    }
    cfg.update(sae.saved_config_extras())
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_FILE, tensors)
    write_sparsity(path, sparsity, sae.cfg.d_sae)
    write_json(path / CFG_FILE, cfg)
    return path


def write_sparsity(path: Path, sparsity: torch.Tensor | None, d_sae: int) -> None:
    """`sparsity.safetensors` (log10 firing frequency per latent), or none: a stale one would describe another SAE."""
    if sparsity is None:
        (path / SPARSITY_FILE).unlink(missing_ok=True)
        return
    if sparsity.shape != (d_sae,):
        raise ConfigError(f"sparsity must have shape [{d_sae}] (got {tuple(sparsity.shape)})")
    write_safetensors(path / SPARSITY_FILE, {"sparsity": torch.log10(sparsity.double() + 1e-10).float()})


def d_out(sae: SAE) -> int:
    """The width an SAE writes (its d_in unless it is a transcoder of another width)."""
    return sae.cfg.output_width


def is_transcoder(sae: SAE) -> bool:
    """True for a dictionary that writes another site than it reads."""
    return sae.cfg.is_transcoder


def reads_several_sites(sae: SAE, refuse: bool = False) -> bool:
    """True for a crosscoder or cross-layer transcoder (a list of sites); `refuse`: raise instead."""
    several = len(sae.cfg.read_sites or [None]) > 1 or len(sae.cfg.write_sites or [None]) > 1
    if several and refuse:
        raise ConfigError(
            f"this {sae.architecture} dictionary reads or writes several sites (a crosscoder or cross-layer "
            "transcoder), which the SAELens layout cannot describe; save it with saelab.save (saelab's "
            "dictionary layout, see saelab.io.dictionary; saelab convert: --to saelab-dictionary)"
        )
    return several


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(f"{path} is not a folder; give the folder that holds {CFG_FILE} and {WEIGHTS_FILE}")
    cfg_path = path / CFG_FILE
    if not cfg_path.exists():
        raise FileFormatError(f"{cfg_path} is missing; an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = read_json(cfg_path, "the file may be truncated")
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{cfg_path} must hold a JSON object")
    return cfg


# The SAELens keys saelab reads, with the JSON type each must have when present.
_KEY_TYPES: dict[str, tuple[type, str]] = {
    "architecture": (str, "a string"),
    "d_in": (int, "a positive integer"),
    "d_sae": (int, "a positive integer"),
    "d_out": (int, "a positive integer"),
    "k": (int, "a positive integer"),
    "apply_b_dec_to_input": (bool, "true or false"),
    "rescale_acts_by_decoder_norm": (bool, "true or false"),
    "normalize_activations": (str, "a string"),
    "metadata": (dict, "an object"),
}


def _saelab_config(cfg: dict[str, Any]) -> dict[str, Any]:
    for key, (kind, what) in _KEY_TYPES.items():
        value = cfg.get(key)
        if key in ("d_in", "d_sae") and value is None:
            raise FileFormatError(f"cfg.json needs an integer '{key}' (got nothing)")
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value <= 0)):
            raise FileFormatError(f"cfg.json: '{key}' must be {what} (got {value!r:.60})")
    metadata = cfg.get("metadata") or {}
    own = metadata.get("saelab_config")
    if "architecture" not in cfg:
        trained = f" (saelab's metadata says it was trained as {own['architecture']!r})" if _named(own) else ""
        raise FileFormatError(
            f"cfg.json has no 'architecture'{trained}; saelab does not guess one: add the architecture the "
            f"weights were saved as (SAELens names such as 'standard', 'topk', 'jumprelu', 'gated')"
        )
    disk_arch = cfg["architecture"]
    transcoder = saelens_transcoders.config_values(cfg) if saelens_transcoders.is_transcoder_file(cfg) else {}
    architecture = transcoder.get("architecture") or _FROM_SAELENS.get(disk_arch, disk_arch)
    try:
        get_class(architecture)  # unknown architectures fail here with the valid list
    except ConfigError as exc:
        raise FileFormatError(f"cfg.json: {exc}") from None
    norm = cfg.get("normalize_activations", "none")
    if norm not in _SUPPORTED_NORMALIZATION:
        raise FileFormatError(
            f"cfg.json has normalize_activations={norm!r}, which saelab cannot apply inside the SAE; "
            f"supported: {sorted(_SUPPORTED_NORMALIZATION)} (fold the normalisation into the weights first)"
        )
    values: dict[str, Any] = {}
    if _named(own) and own.get("architecture") == architecture:
        values.update(own)  # keeps training settings (coefficients, seeds) of saelab-written files
    elif _named(own):  # saved as another architecture (BatchTopK as JumpReLU): keep where it reads and writes
        values.update({k: own[k] for k in _SITE_KEYS if k in own})
    values.update(
        architecture=architecture,
        d_in=cfg["d_in"],
        d_sae=cfg["d_sae"],
        apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
    )
    values.update(transcoder)
    try:
        values.update(get_class(architecture).config_from_saved(cfg, values))
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"cfg.json holds a value '{architecture}' cannot read ({exc})") from None
    return values


# The keys of every saelab config that say which sites a dictionary reads and writes, and its widths.
_SITE_KEYS = ("site", "write_site", "d_out", "skip", "decoder_norm")


def _named(own: Any) -> bool:
    return isinstance(own, dict) and isinstance(own.get("architecture"), str)


def load(path: str | Path, device: str = "cpu", d_in: int | None = None) -> SAE:
    """Load an SAE folder written by saelab or SAELens. `d_in`, if given, must match the file."""
    path = Path(path)
    cfg = read_config(path)
    values = _saelab_config(cfg)
    if d_in is not None and values["d_in"] != d_in:
        raise ConfigError(
            f"{path} holds an SAE with d_in={values['d_in']} but d_in={d_in} was expected; "
            "load the SAE trained on this hookpoint"
        )
    try:
        sae_cfg = make_config(values)
    except ConfigError as exc:
        raise FileFormatError(f"{path / CFG_FILE} holds an invalid config: {exc}") from None
    sae = get_class(sae_cfg.architecture)(sae_cfg)
    expected = {k: tuple(v.shape) for k, v in sae.saved_state().items()}
    weights_path = path / WEIGHTS_FILE
    if not weights_path.exists():
        raise FileFormatError(f"{weights_path} is missing; the SAE folder is incomplete")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{weights_path} cannot be read ({exc}); the file may be truncated") from None
    tensors = {k: v.float() for k, v in tensors.items()}
    folded: dict[str, Any] = {}
    if "topk_threshold" in tensors:  # a SAELens BatchTopK-family training checkpoint
        tensors["threshold"] = tensors.pop("topk_threshold").reshape(()).expand(values["d_sae"]).clone()
    if cfg.get("rescale_acts_by_decoder_norm"):
        tensors = _fold_decoder_norm(tensors)
        folded["decoder_norm"] = "W_enc and b_enc multiplied by |W_dec| rows, W_dec rows set to unit norm"
    if values["architecture"] == "matching_pursuit" and not _saelab_written(cfg):
        tensors = _sae_lens_matching_pursuit(tensors, values, weights_path)
    if saelens_transcoders.is_transcoder_file(cfg):
        tensors = saelens_transcoders.state_from_file(tensors, expected)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise FileFormatError(
            f"{weights_path} does not match architecture '{cfg.get('architecture')}': "
            f"missing {missing}, unexpected {extra}"
        )
    widths = f", d_out={values['d_out']}" if values.get("d_out") else ""
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise FileFormatError(
                f"{weights_path}: '{key}' has shape {tuple(tensors[key].shape)} but cfg.json "
                f"(d_in={values['d_in']}, d_sae={values['d_sae']}{widths}) implies {shape}"
            )
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise FileFormatError(
                f"{weights_path}: '{key}' contains NaN or Inf; the SAE is broken (retrain it, or resume its "
                "training from an earlier checkpoint)"
            )
    sae.load_saved_state(tensors)
    sae.provenance = _provenance(cfg, path, folded)
    return sae.to(device).eval()


def _saelab_written(cfg: dict[str, Any]) -> bool:
    return isinstance((cfg.get("metadata") or {}).get("saelab_config"), dict)


def _provenance(cfg: dict[str, Any], path: Path, folded: dict[str, Any]) -> dict[str, Any]:
    """Where the SAE came from: this folder, plus the original source of a file saelab converted."""
    metadata = cfg.get("metadata") or {}
    earlier = metadata.get("saelab_provenance")
    out: dict[str, Any] = {"source_format": "saelens", "source_path": str(path)}
    if isinstance(earlier, dict):
        out.update({k: v for k, v in earlier.items() if k not in ("source_format", "source_path")})
        if earlier.get("source_format") != "saelens":
            out["converted_from"] = {"format": earlier.get("source_format"), "path": earlier.get("source_path")}
    hook = metadata.get("hook_name") or cfg.get("hook_name")
    if hook and "hook_name" not in out:
        out["hook_name"] = hook
    hook_out = metadata.get("hook_name_out") or cfg.get("hook_name_out")
    if hook_out and "hook_name_out" not in out:
        out["hook_name_out"] = hook_out
    if saelens_transcoders.is_transcoder_file(cfg) and saelens_transcoders.unnamed_hooks(cfg):
        out["unnamed_hooks"] = (
            f"cfg.json names no {' or '.join(saelens_transcoders.unnamed_hooks(cfg))}; the sites are placeholders "
            f"'{saelens_transcoders.PLACEHOLDER_IN}' -> '{saelens_transcoders.PLACEHOLDER_OUT}'"
        )
    if folded:
        out["folded_scaling"] = {**out.get("folded_scaling", {}), **folded}
    return out


def _sae_lens_matching_pursuit(tensors: dict[str, torch.Tensor], values: dict[str, Any], path: Path):
    """SAELens' pursuit scores atoms by raw inner products and adds b_dec back only when it was
    subtracted; saelab's normalises by atom norms, which is the same pursuit for unit-norm atoms."""
    norms = tensors["W_dec"].norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise FileFormatError(
            f"{path}: a SAELens matching-pursuit SAE needs unit-norm decoder rows for saelab to compute the "
            f"same codes (row norms range {norms.min():.4g}..{norms.max():.4g})"
        )
    if not values["apply_b_dec_to_input"]:
        tensors = {**tensors, "b_dec": torch.zeros_like(tensors["b_dec"])}  # SAELens ignores it then
    return tensors


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens' TopK `rescale_acts_by_decoder_norm`: fold the norms so plain TopK computes the same."""
    tensors = dict(tensors)
    norms = tensors["W_dec"].norm(dim=1)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    return tensors


def load_sparsity(path: str | Path) -> torch.Tensor | None:
    """Per-latent firing frequency from `sparsity.safetensors`, or None when absent."""
    p = Path(path) / SPARSITY_FILE
    if not p.exists():
        return None
    try:
        return torch.pow(10.0, load_file(str(p))["sparsity"].double()).float()
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise FileFormatError(f"{p} cannot be read ({exc})") from None
