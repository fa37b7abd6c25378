"""EleutherAI sparsify: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

sparsify's SparseCoder stores `encoder.weight [F, d]` (nn.Linear), `encoder.bias [F]`, `W_dec [F, d]`
and `b_dec [d]`. An SAE encodes TopK(ReLU((x - b_dec) W^T + b)) and decodes f W_dec + b_dec, which is
saelab's TopK with `W_enc = encoder.weight^T`; `normalize_decoder` only changes training. The folder
name is the hookpoint, a module path in the model (`layers.N` is block N's output, `layers.N.mlp`
its MLP).

A transcoder (`transcode: true`) reads the hookpoint module's *input* and writes its output, and
does not subtract b_dec (which lives in the output space): saelab's TopK transcoder with `site`
`<hookpoint>:input`, `write_site` `<hookpoint>` and a zero input bias. A skip transcoder
(`skip_connection: true`) adds `x @ W_skip^T` with `W_skip [d, d]` stored as [out, in], saelab's own
orientation, so it is taken as it is. sparsify's coders write the width they read (d_out = d_in).
A skip connection on an SAE (no `transcode`) and the `groupmax` activation have no saelab class and
are refused by name. A root folder holding several hookpoints is refused with their names: load one.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if skip and not transcode:
        raise FileFormatError(
            f"{cfg_path}: a sparsify SAE with skip_connection (and no transcode) has no saelab class; saelab "
            "reads skip connections on transcoders only"
        )
    if cfg.get("activation", "topk") != "topk":
        raise FileFormatError(f"{cfg_path}: activation {cfg.get('activation')!r} has no saelab class (only 'topk')")
    tensors = read_safetensors(weights_path)
    what = "sparsify skip transcoder" if skip else "sparsify transcoder" if transcode else "sparsify SAE"
    require_keys(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + ["W_skip"] * skip, weights_path, what)
    d_in = cfg["d_in"]
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    why = f"cfg.json (d_in={d_in}, {d_sae} latents)"
    check_shape(tensors["encoder.weight"], (d_sae, d_in), "encoder.weight", weights_path, why)
    check_shape(tensors["encoder.bias"], (d_sae,), "encoder.bias", weights_path, why)
    check_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path, why)
    check_shape(tensors["b_dec"], (d_in,), "b_dec", weights_path, why)
    hook = folder.name
    state = {
        "W_enc": tensors["encoder.weight"].t(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    values = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": int(cfg.get("k", 32))}
    provenance = {
        "source_format": "sparsify",
        "hook_name": hook,
        "hook_convention": "sparsify module path (its output)",
    }
    if transcode:
        values.update(site=f"{hook}:input", write_site=hook, d_out=d_in, skip=skip, apply_b_dec_to_input=False)
        state["b_in"] = torch.zeros(d_in)
        if skip:
            check_shape(tensors["W_skip"], (d_in, d_in), "W_skip", weights_path, why)
            state["W_skip"] = tensors["W_skip"]
        provenance.update(
            hook_name=f"{hook}:input",
            hook_name_out=hook,
            hook_convention="sparsify module path: the transcoder reads its input and writes its output",
        )
    return build(values, state, folder, provenance)


def _write(sae: SAE, folder: Path) -> Path:
    """A saelab TopK SAE or TopK (skip) transcoder as a sparsify SparseCoder folder (`sparsify` loads it
    with the same codes). A transcoder's input bias is folded into the encoder bias (sparsify has
    none): (x - b_in) W_enc + b_enc = x W_enc + (b_enc - b_in W_enc)."""
    cfg = sae.cfg
    transcoder = cfg.is_transcoder
    if sae.architecture != "topk" or not (transcoder or cfg.apply_b_dec_to_input):
        raise FileFormatError(
            f"sparsify stores TopK SAEs that subtract b_dec before encoding, and TopK transcoders; this is a "
            f"'{sae.architecture}' {'transcoder' if transcoder else 'SAE'}"
            f"{'' if transcoder or cfg.apply_b_dec_to_input else ' without apply_b_dec_to_input'}"
        )
    if transcoder and (len(cfg.read_sites) > 1 or cfg.output_width != cfg.d_in):
        raise FileFormatError(
            f"sparsify transcoders write the width they read; this one reads {cfg.d_in} and writes {cfg.output_width}"
        )
    folder = Path(folder)
    W_enc = sae.W_enc.detach().float()
    b_enc = sae.b_enc.detach().float()
    tensors = {"encoder.weight": W_enc.t().contiguous(), "encoder.bias": b_enc}
    if transcoder:
        tensors["encoder.bias"] = b_enc - sae.b_in.detach().float() @ W_enc
    tensors.update(W_dec=sae.W_dec.detach().float(), b_dec=sae.b_dec.detach().float())
    if cfg.skip:
        tensors["W_skip"] = sae.W_skip.detach().float()
    write_safetensors(folder / WEIGHTS, tensors)
    write_json(
        folder / CFG,
        {
            "activation": "topk",
            "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
            "normalize_decoder": cfg.decoder_norm == "unit",
            "num_latents": cfg.d_sae,
            "k": cfg.k,
            "multi_topk": False,
            "skip_connection": cfg.skip,
            "transcode": transcoder,
            "d_in": cfg.d_in,
        },
    )
    return folder


FORMAT = register_format(
    Format(
        name="sparsify",
        reads="<hookpoint>/cfg.json + sae.safetensors: TopK SAEs, transcoders and skip transcoders (sparsify "
        "SparseCoder)",
        detect=_detect,
        read=_read,
        write=_write,
    )
)
