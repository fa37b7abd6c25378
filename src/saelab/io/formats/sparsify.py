"""EleutherAI sparsify: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

sparsify's SparseCoder stores `encoder.weight [F, d]` (nn.Linear), `encoder.bias [F]`, `W_dec [F, d]`
and `b_dec [d]`. An SAE encodes TopK(ReLU((x - b_dec) W^T + b)) and decodes f W_dec + b_dec, which is
saelab's TopK with `W_enc = encoder.weight^T`; `normalize_decoder` only changes training. The folder
name is the hookpoint, a module path in the model (`layers.N` is block N's output, `layers.N.mlp`
its MLP). Transcoders (`transcode`, `W_skip`) and the `groupmax` activation have no saelab class yet.
A root folder holding several hookpoints is refused with their names: load one of them.
"""

from __future__ import annotations

from pathlib import Path

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors
from saelab.io.formats.base import Format, build, check_shape, read_safetensors, register_format, require_keys
from saelab.sae.base import SAE

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def _is_coder(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def _hookpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_coder(p)) if folder.is_dir() else []


def _detect(folder: Path) -> bool:
    return _is_coder(folder) or bool(_hookpoints(folder))


def _read(folder: Path) -> SAE:
    if not _is_coder(folder):
        hooks = _hookpoints(folder)
        if len(hooks) != 1:
            raise FileFormatError(
                f"{folder} holds sparsify coders for several hookpoints ({', '.join(hooks)}); load one of their folders"
            )
        folder = folder / hooks[0]
    cfg_path, weights_path = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfg_path, "the file may be truncated")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("d_in"), int):
        raise FileFormatError(f"{cfg_path} must be a JSON object with an integer 'd_in'")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise FileFormatError(
            f"{cfg_path} describes a sparsify transcoder (transcode/skip_connection); saelab reads sparsify SAEs only"
        )
    if cfg.get("activation", "topk") != "topk":
        raise FileFormatError(f"{cfg_path}: activation {cfg.get('activation')!r} has no saelab class (only 'topk')")
    tensors = read_safetensors(weights_path)
    require_keys(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights_path, "sparsify SAE")
    d_in = cfg["d_in"]
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    why = f"cfg.json (d_in={d_in}, {d_sae} latents)"
    check_shape(tensors["encoder.weight"], (d_sae, d_in), "encoder.weight", weights_path, why)
    check_shape(tensors["encoder.bias"], (d_sae,), "encoder.bias", weights_path, why)
    check_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path, why)
    check_shape(tensors["b_dec"], (d_in,), "b_dec", weights_path, why)
    state = {
        "W_enc": tensors["encoder.weight"].t(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    values = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": int(cfg.get("k", 32))}
    return build(
        values,
        state,
        folder,
        {"source_format": "sparsify", "hook_name": folder.name, "hook_convention": "sparsify module path (its output)"},
    )


def _write(sae: SAE, folder: Path) -> Path:
    """A saelab TopK SAE as a sparsify SparseCoder folder (`sparsify` loads it with the same codes)."""
    if sae.architecture != "topk" or not sae.cfg.apply_b_dec_to_input:
        raise FileFormatError(
            f"sparsify stores TopK SAEs that subtract b_dec before encoding; this SAE is '{sae.architecture}'"
            f"{'' if sae.cfg.apply_b_dec_to_input else ' without apply_b_dec_to_input'}"
        )
    folder = Path(folder)
    W_enc = sae.W_enc.detach().float()
    write_safetensors(
        folder / WEIGHTS,
        {
            "encoder.weight": W_enc.t().contiguous(),
            "encoder.bias": sae.b_enc.detach().float(),
            "W_dec": sae.W_dec.detach().float(),
            "b_dec": sae.b_dec.detach().float(),
        },
    )
    write_json(
        folder / CFG,
        {
            "activation": "topk",
            "expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in),
            "normalize_decoder": sae.cfg.decoder_norm == "unit",
            "num_latents": sae.cfg.d_sae,
            "k": sae.cfg.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": sae.cfg.d_in,
        },
    )
    return folder


FORMAT = register_format(
    Format(
        name="sparsify",
        reads="<hookpoint>/cfg.json + sae.safetensors: TopK SAEs (sparsify SparseCoder)",
        detect=_detect,
        read=_read,
        write=_write,
    )
)
