"""Transcoders, skip transcoders and cross-layer transcoders in other libraries' files.

Tiny random files with asymmetric shapes (d_in 5, d_out 7 where the format allows it, 15 latents), so a
transposed or swapped tensor fails. Each is loaded by saelab and compared with the library's own
forward where it installs here (sparsify; SAELens' own Gemma Scope loaders, served local files in
place of the hub; circuit-tracer in its own environment), else with a NumPy forward of the format's
documented semantics written here. Each then round-trips through the layout `saelab.save` picks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import saelab
from saelab.cli import main
from saelab.errors import FileFormatError
from saelab.io import formats
from tests.io.test_formats import assert_matches, fired_fraction, np64, reference_library, run_reference

D_IN, D_OUT, D_SAE = 5, 7, 15


def inputs(n: int = 256, d: int = D_IN) -> torch.Tensor:
    return torch.randn(n, d) * 2.0


def saved_and_loaded(sae, tmp_path: Path, x: torch.Tensor, source_format: str, layout: str):
    """`saelab.save` writes `layout` (SAELens v6 where it has the class); the load keeps the outputs."""
    out = saelab.save(sae, tmp_path / "saved")
    assert formats.detect(out).name == layout
    back = saelab.load(out)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert (back.cfg.site, back.cfg.write_site) == (sae.cfg.site, sae.cfg.write_site)
    assert back.provenance["converted_from"]["format"] == source_format
    return back


# ------------------------------------------------------------------------------------------ sparsify


def _sparsify_transcoder(skip: bool, k: int = 4, seed: int = 0):
    sparsify = reference_library("sparsify")
    cfg = sparsify.SparseCoderConfig(num_latents=D_SAE, k=k, transcode=True, skip_connection=skip)
    coder = sparsify.SparseCoder(D_IN, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return coder


def _sparsify_codes(coder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
    return torch.zeros(x.shape[0], coder.num_latents).scatter_(1, idx, acts)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_matches_sparsify(skip, tmp_path):
    coder = _sparsify_transcoder(skip)
    coder.save_to_disk(tmp_path / "layers.2.mlp")
    sae = saelab.load(tmp_path / "layers.2.mlp")
    assert sae.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.skip == skip
    assert (sae.cfg.site, sae.cfg.write_site) == ("layers.2.mlp:input", "layers.2.mlp")
    x = inputs()
    assert_matches(sae.encode(x), _sparsify_codes(coder, x), "sparsify transcoder encode")
    with torch.no_grad():
        assert_matches(sae(x), coder(x).sae_out, "sparsify transcoder forward")
    if skip:  # the skip path carries weight here, so a transposed W_skip would fail the line above
        assert (x @ coder.W_skip.detach().T).abs().mean() > 0.3 * coder(x).sae_out.abs().mean()
    assert sae.provenance["hook_name_out"] == "layers.2.mlp"
    saved_and_loaded(sae, tmp_path, x, "sparsify", "saelab-dictionary")  # SAELens has no TopK transcoder


def test_saelab_topk_transcoder_written_as_sparsify_loads_in_sparsify(tmp_path):
    sparsify = reference_library("sparsify")
    for seed, skip in ((0, False), (1, True)):
        cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 3, "seed": seed}
        cfg.update(site="layers.1.mlp:input", write_site="layers.1.mlp", skip=skip)
        sae = saelab.create(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p))  # b_in too: the writer must fold it into the encoder bias
        sae.eval()
        formats.get_format("sparsify").write(sae, tmp_path / f"s{seed}" / "layers.1.mlp")
        theirs = sparsify.SparseCoder.load_from_disk(tmp_path / f"s{seed}" / "layers.1.mlp")
        assert theirs.cfg.transcode and theirs.cfg.skip_connection == skip
        x = inputs()
        assert_matches(sae.encode(x), _sparsify_codes(theirs, x), "sparsify reads a saelab transcoder")
        with torch.no_grad():
            assert_matches(sae(x), theirs(x).sae_out, "sparsify forward of a saelab transcoder")
    wide = saelab.create({"architecture": "topk", "d_in": D_IN, "d_out": D_OUT, "d_sae": D_SAE, "k": 3,
                          "site": "a", "write_site": "b"})  # fmt: skip
    with pytest.raises(FileFormatError, match="write the width they read"):
        formats.get_format("sparsify").write(wide, tmp_path / "wide")


def test_sparsify_skip_sae_and_groupmax_are_refused_by_name(tmp_path):
    coder = _sparsify_transcoder(True)
    coder.save_to_disk(tmp_path / "layers.0")
    cfg_path = tmp_path / "layers.0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "transcode": False}))
    with pytest.raises(FileFormatError, match="skip_connection.*transcoders only"):
        saelab.load(tmp_path / "layers.0")
    cfg_path.write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(FileFormatError, match="groupmax"):
        saelab.load(tmp_path / "layers.0")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "layers.0" / "sae.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(FileFormatError, match=r"sae\.safetensors.*truncated"):
        saelab.load(tmp_path / "layers.0")


# -------------------------------------------------------------------------------------- Gemma Scope


def _jumprelu_transcoder_tensors(d_out: int, seed: int, skip: bool, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {
        "w_enc": torch.randn(D_IN, d_sae, generator=gen),
        "w_dec": torch.randn(d_sae, d_out, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "b_dec": torch.randn(d_out, generator=gen),
        "threshold": 0.2 + 2 * torch.rand(d_sae, generator=gen),
    }
    if skip:
        t["affine_skip_connection"] = torch.randn(D_IN, d_out, generator=gen)
    return t


def _gemma_numpy(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gemma Scope's transcoder: f = pre * (pre > threshold) on pre = x w_enc + b_enc (nothing subtracted),
    y = f w_dec + b_dec (+ x @ affine_skip_connection, stored [d_in, d_out])."""
    n = {k.lower(): np64(v) for k, v in t.items()}
    pre = np64(x) @ n["w_enc"] + n["b_enc"]
    f = pre * (pre > n["threshold"])
    y = f @ n["w_dec"] + n["b_dec"]
    return f, (y + np64(x) @ n["affine_skip_connection"] if "affine_skip_connection" in n else y)


GS2_IN, GS2_OUT = "model.layers.2.pre_feedforward_layernorm.output", "model.layers.2.post_feedforward_layernorm.output"


def _write_gemma_scope_2_transcoder(folder: Path, skip: bool, seed: int = 0, **cfg_extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    t = _jumprelu_transcoder_tensors(D_OUT, seed, skip)
    save_file(t, str(folder / "params.safetensors"))
    cfg = {"architecture": "jump_relu", "type": "transcoder", "width": D_SAE, "l0": 4, "model_name": "gemma-v3-tiny"}
    cfg.update({"hf_hook_point_in": GS2_IN, "hf_hook_point_out": GS2_OUT, "affine_connection": skip, **cfg_extra})
    (folder / "config.json").write_text(json.dumps(cfg))
    return t


def _sae_lens_gemma_loader(monkeypatch, root: Path):
    """SAELens' pretrained loaders, with the hub's download and shape look-up served from `root`."""
    reference_library("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from safetensors import safe_open

    def local_download(repo_id, filename, subfolder=None, **kwargs):
        return str(root / (subfolder or "") / filename)

    def local_shapes(repo_id, filename):
        with safe_open(str(root / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", local_shapes)
    return loaders


def _sae_lens_model(cfg: dict, state: dict):
    from sae_lens.saes.sae import get_sae_class

    cls, cfg_cls = get_sae_class(cfg["architecture"])
    model = cls(cfg_cls(d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg["d_out"], apply_b_dec_to_input=False))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_2_transcoder_matches_numpy_and_sae_lens(skip, tmp_path, monkeypatch):
    folder = tmp_path / "transcoder_all" / ("layer_2_width_15_l0_small" + ("_affine" if skip else ""))
    t = _write_gemma_scope_2_transcoder(folder, skip, seed=int(skip))
    sae = saelab.load(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.skip == skip and sae.cfg.output_width == D_OUT
    assert (sae.cfg.site, sae.cfg.write_site) == (GS2_IN, GS2_OUT)
    x = inputs()
    f_ref, y_ref = _gemma_numpy(t, x)
    assert 0.05 < fired_fraction(torch.from_numpy(f_ref)) < 0.95
    assert_matches(sae.encode(x), f_ref, "gemma scope 2 transcoder encode")
    assert_matches(sae(x), y_ref, "gemma scope 2 transcoder forward")
    loaders = _sae_lens_gemma_loader(monkeypatch, tmp_path)
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
        "google/gemma-scope-2-tiny-pt", str(folder.relative_to(tmp_path)), device="cpu"
    )
    assert cfg["architecture"] == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    theirs = _sae_lens_model(cfg, state)
    with torch.no_grad():
        assert_matches(sae.encode(x), theirs.encode(x), "gemma scope 2 transcoder vs SAELens encode")
        assert_matches(sae(x), theirs(x), "gemma scope 2 transcoder vs SAELens forward")
    back = saved_and_loaded(sae, tmp_path, x, "gemma_scope_2", "saelens")
    formats.get_format("gemma_scope_2").write(back, tmp_path / "again")  # and back into Gemma Scope 2
    again = saelab.load(tmp_path / "again")
    assert_matches(again(x), y_ref, "gemma scope 2 written by saelab")
    assert (again.cfg.site, again.cfg.write_site, again.cfg.skip) == (GS2_IN, GS2_OUT, skip)


def test_gemma_scope_2_bad_transcoder_files(tmp_path):
    t = _write_gemma_scope_2_transcoder(tmp_path / "tc", skip=True)
    save_file({**t, "affine_skip_connection": t["affine_skip_connection"].t().contiguous()},
              str(tmp_path / "tc" / "params.safetensors"))  # fmt: skip
    with pytest.raises(FileFormatError, match=r"params\.safetensors: 'affine_skip_connection' has shape \(7, 5\)"):
        saelab.load(tmp_path / "tc")
    save_file(
        {k: v for k, v in t.items() if k != "affine_skip_connection"}, str(tmp_path / "tc" / "params.safetensors")
    )
    with pytest.raises(FileFormatError, match="affine_connection but .* no 'affine_skip_connection'"):
        saelab.load(tmp_path / "tc")
    save_file({**t, "threshold": -t["threshold"]}, str(tmp_path / "tc" / "params.safetensors"))
    with pytest.raises(FileFormatError, match="negative or non-finite JumpReLU thresholds"):
        saelab.load(tmp_path / "tc")
    _write_gemma_scope_2_transcoder(tmp_path / "clt", skip=False, type="clt")
    with pytest.raises(FileFormatError, match="Gemma Scope 2 'clt'"):
        saelab.load(tmp_path / "clt")
    _write_gemma_scope_2_transcoder(tmp_path / "same", skip=False, hf_hook_point_out=GS2_IN)
    with pytest.raises(FileFormatError, match="reads and writes the same hook"):
        saelab.load(tmp_path / "same")


def test_gemma_scope_1_transcoder_matches_sae_lens(tmp_path, monkeypatch):
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_1k" / "average_l0_4"
    folder.mkdir(parents=True)
    t = _jumprelu_transcoder_tensors(D_OUT, 2, skip=False, d_sae=1024)  # SAELens reads the width as N k
    np.savez(folder / "params.npz", **{k.replace("w_", "W_"): v.numpy() for k, v in t.items()})
    sae = saelab.load(folder)
    assert (sae.cfg.site, sae.cfg.write_site) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    x = inputs()
    f_ref, y_ref = _gemma_numpy(t, x)
    assert_matches(sae.encode(x), f_ref, "gemma scope 1 transcoder encode")
    assert_matches(sae(x), y_ref, "gemma scope 1 transcoder forward")
    loaders = _sae_lens_gemma_loader(monkeypatch, tmp_path / "gemma-scope-2b-pt-transcoders")
    cfg, state, _ = loaders.gemma_2_transcoder_huggingface_loader(
        "google/gemma-scope-2b-pt-transcoders",
        "layer_3/width_1k/average_l0_4",
        cfg_overrides={"d_in": D_IN, "d_out": D_OUT},  # the loader's table knows only Gemma 2's widths
    )
    assert (cfg["hook_name"], cfg["hook_name_out"]) == (sae.cfg.site, sae.cfg.write_site)
    theirs = _sae_lens_model(cfg, state)
    with torch.no_grad():
        assert_matches(sae(x), theirs(x), "gemma scope 1 transcoder vs SAELens forward")
    saved_and_loaded(sae, tmp_path, x, "gemma_scope_1", "saelens")


def test_gemma_scope_1_embedding_scaling_matches_sae_lens(tmp_path, monkeypatch):
    """SAELens' Gemma 2 loader divides W_enc by sqrt(d) and multiplies W_dec by it for embedding SAEs."""
    root = tmp_path / "gemma-scope-2b-pt-res"
    folder = root / "embedding" / "width_15" / "average_l0_4"
    folder.mkdir(parents=True)
    t = _jumprelu_transcoder_tensors(D_IN, 3, skip=False)
    np.savez(folder / "params.npz", **{k.replace("w_", "W_"): v.numpy() for k, v in t.items()})
    loaders = _sae_lens_gemma_loader(monkeypatch, root)
    cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
        "google/gemma-scope-2b-pt-res", "embedding/width_15/average_l0_4", cfg_overrides={"d_in": D_IN, "d_sae": D_SAE}
    )
    assert cfg["hook_name"] == "hook_embed"
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)).eval()
    theirs.load_state_dict(state)
    sae = saelab.load(folder)
    x = inputs() * math.sqrt(D_IN)  # hook_embed is sqrt(d) times larger than what the SAE was trained on
    with torch.no_grad():
        assert 0.05 < fired_fraction(theirs.encode(x)) < 0.95
        assert_matches(sae.encode(x), theirs.encode(x), "embedding SAE vs SAELens encode")
        assert_matches(sae(x), theirs(x), "embedding SAE vs SAELens forward")


# -------------------------------------------------------------------------------------- Llama Scope

LS_NORM_IN, LS_NORM_OUT, LS_THETA = 7.5, 2.5, 0.4


def _write_llama_scope_transcoder(folder: Path, act_fn: str = "jumprelu", **extra) -> tuple[dict, dict]:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    hp = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.3.ln2.hook_normalized",
        "hook_point_out": "blocks.3.hook_mlp_out",
        "act_fn": act_fn,
        "jump_relu_threshold": LS_THETA,
        "top_k": 4,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": LS_NORM_IN, "out": LS_NORM_OUT},
        "apply_decoder_bias_to_pre_encoder": False,
        "use_decoder_bias": True,
        **extra,
    }
    gen = torch.Generator().manual_seed(4)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=gen),
        "encoder.bias": torch.randn(D_SAE, generator=gen),
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=gen),
        "decoder.bias": torch.randn(D_IN, generator=gen),
    }
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return hp, t


def test_llama_scope_transcoder_folds_both_norms(tmp_path):
    hp, t = _write_llama_scope_transcoder(tmp_path / "L3M-tc")
    sae = saelab.load(tmp_path / "L3M-tc")
    assert (sae.cfg.site, sae.cfg.write_site) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    n = {k: np64(v) for k, v in t.items()}
    s_in, s_out = math.sqrt(D_IN) / LS_NORM_IN, math.sqrt(D_IN) / LS_NORM_OUT
    x = inputs() * 3
    pre = (np64(x) * s_in) @ n["encoder.weight"].T + n["encoder.bias"]  # the transcoder ran on normalised inputs
    f = pre * (pre > LS_THETA * s_in)
    y = (f @ n["decoder.weight"].T + n["decoder.bias"]) / s_out  # ... and predicted normalised outputs
    assert 0.05 < fired_fraction(torch.from_numpy(f)) < 0.95
    assert_matches(sae.encode(x), f, "llama scope transcoder encode")
    assert_matches(sae(x), y, "llama scope transcoder forward")
    folded = sae.provenance["folded_scaling"]
    assert folded["input_scale"] == pytest.approx(s_in) and folded["output_scale"] == pytest.approx(1 / s_out)
    saved_and_loaded(sae, tmp_path, x, "llama_scope", "saelens")
    _write_llama_scope_transcoder(tmp_path / "topk", act_fn="topk")
    assert saelab.load(tmp_path / "topk").cfg.write_site == "blocks.3.hook_mlp_out"
    _write_llama_scope_transcoder(tmp_path / "bad", apply_decoder_bias_to_pre_encoder=True)
    with pytest.raises(FileFormatError, match="apply_decoder_bias_to_pre_encoder on a transcoder"):
        saelab.load(tmp_path / "bad")


def test_convert_writes_transcoders_to_saelens(tmp_path, capsys):
    folder = tmp_path / "gs2"
    t = _write_gemma_scope_2_transcoder(folder, skip=True)
    assert main(["convert", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert "gemma_scope_2 -> saelens" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == D_OUT
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (GS2_IN, GS2_OUT)
    x = inputs(64)
    assert_matches(saelab.load(tmp_path / "out")(x), _gemma_numpy(t, x)[1], "converted skip transcoder")


# ------------------------------------------------------------------------------------ circuit-tracer

CT_LAYERS, CT_D = 3, 5  # circuit-tracer's transcoders write the width they read
CT_HOOKS = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}


def _ct_config(folder: Path, kind: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": kind, **CT_HOOKS, "model_name": "tiny"}))


def _write_ct_set(folder: Path, jump: bool, skip: bool, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """A circuit-tracer transcoder set: layer_L.safetensors per layer, as its to_safetensors writes them."""
    _ct_config(folder, "transcoder_set")
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(CT_LAYERS):
        t = {
            "W_enc": torch.randn(D_SAE, CT_D, generator=gen),
            "W_dec": torch.randn(D_SAE, CT_D, generator=gen),
            "b_enc": torch.randn(D_SAE, generator=gen),
            "b_dec": torch.randn(CT_D, generator=gen),
        }
        if jump:
            t["activation_function.threshold"] = 0.2 + 2 * torch.rand(D_SAE, generator=gen)
        if skip:
            t["W_skip"] = torch.randn(CT_D, CT_D, generator=gen)
        save_file(t, str(folder / f"layer_{layer}.safetensors"))
        layers.append(t)
    return layers


def _ct_layer_numpy(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's PLT: pre = x W_enc^T + b_enc, f = pre * (pre > threshold) (else ReLU),
    y = f W_dec + b_dec (+ x W_skip^T)."""
    n = {k: np64(v) for k, v in t.items()}
    pre = np64(x) @ n["W_enc"].T + n["b_enc"]
    theta = n.get("activation_function.threshold")
    f = pre * (pre > theta) if theta is not None else np.maximum(pre, 0)
    y = f @ n["W_dec"] + n["b_dec"]
    return f, (y + np64(x) @ n["W_skip"].T if "W_skip" in n else y)


def _write_ct_clt(folder: Path, jump: bool, seed: int = 6) -> list[dict[str, torch.Tensor]]:
    """A circuit-tracer CLT: W_enc_i.safetensors (W_enc_i [F, d], b_enc_i, b_dec_i, threshold_i) and
    W_dec_i.safetensors (W_dec_i [F, L - i, d])."""
    _ct_config(folder, "cross_layer_transcoder")
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(CT_LAYERS):
        enc = {
            f"W_enc_{i}": torch.randn(D_SAE, CT_D, generator=gen),
            f"b_enc_{i}": torch.randn(D_SAE, generator=gen),
            f"b_dec_{i}": torch.randn(CT_D, generator=gen),
        }
        if jump:
            enc[f"threshold_{i}"] = 0.2 + 2 * torch.rand(D_SAE, generator=gen)
        dec = {f"W_dec_{i}": torch.randn(D_SAE, CT_LAYERS - i, CT_D, generator=gen)}
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file(dec, str(folder / f"W_dec_{i}.safetensors"))
        layers.append({**enc, **dec})
    return layers


def _ct_clt_numpy(layers: list[dict[str, torch.Tensor]], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's CLT on x [L, B, d]: f_l = act(x_l W_enc_l^T + b_enc_l); layer l' receives
    b_dec_l' + sum over l <= l' of f_l W_dec_l[:, l' - l]. Returns f [L, B, F] and y [L, B, d]."""
    n = [{k.rsplit("_", 1)[0]: np64(v) for k, v in t.items()} for t in layers]
    xs = np64(x)
    f = []
    for i, t in enumerate(n):
        pre = xs[i] @ t["W_enc"].T + t["b_enc"]
        f.append(pre * (pre > t["threshold"]) if "threshold" in t else np.maximum(pre, 0))
    y = [n[j]["b_dec"] + sum(f[i] @ n[i]["W_dec"][:, j - i] for i in range(j + 1)) for j in range(len(n))]
    return np.stack(f), np.stack(y)


def _layer_inputs(n: int = 256) -> torch.Tensor:
    return torch.randn(CT_LAYERS, n, CT_D) * 2.0


def _flat(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[L, B, w] -> [B, L*w]: saelab's CLT reads and writes the layers' concatenation."""
    t = torch.as_tensor(np.asarray(t))
    return t.permute(1, 0, 2).reshape(t.shape[1], -1)


@pytest.mark.parametrize("jump,skip", [(True, True), (False, False)])
def test_circuit_tracer_transcoder_matches_numpy(jump, skip, tmp_path):
    layers = _write_ct_set(tmp_path / "set", jump, skip)
    with pytest.raises(FileFormatError, match=r"layers \[0, 1, 2\]; load one layer"):
        saelab.load(tmp_path / "set")
    x = _layer_inputs()
    for layer in (0, 2):
        sae = saelab.load(tmp_path / "set" / f"layer_{layer}.safetensors")
        assert sae.architecture == ("jumprelu" if jump else "relu") and sae.cfg.skip == skip
        assert (sae.cfg.site, sae.cfg.write_site) == (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out")
        f_ref, y_ref = _ct_layer_numpy(layers[layer], x[layer])
        assert 0.05 < fired_fraction(torch.from_numpy(f_ref)) < 0.95
        assert_matches(sae.encode(x[layer]), f_ref, f"circuit-tracer layer {layer} encode")
        assert_matches(sae(x[layer]), y_ref, f"circuit-tracer layer {layer} forward")
    assert sae.provenance["layer"] == 2 and sae.provenance["model_name"] == "tiny"
    back = saved_and_loaded(sae, tmp_path, x[2], "circuit_tracer", "saelens")
    formats.get_format("circuit_tracer").write(back, tmp_path / "again")  # saelab -> circuit-tracer
    again = saelab.load(tmp_path / "again")  # the folder holds one layer, so no choice is needed
    assert_matches(again(x[2]), _ct_layer_numpy(layers[2], x[2])[1], "circuit-tracer file written by saelab")
    assert again.cfg.write_site == "blocks.2.hook_mlp_out"


@pytest.mark.parametrize("jump", [True, False])
def test_circuit_tracer_clt_matches_numpy(jump, tmp_path):
    layers = _write_ct_clt(tmp_path / "clt", jump)
    clt = saelab.load(tmp_path / "clt")
    assert clt.architecture == "clt_jumprelu" and clt.cfg.n_layers == CT_LAYERS and clt.cfg.layer_d_sae == D_SAE
    assert clt.cfg.site == [f"blocks.{i}.hook_resid_mid" for i in range(CT_LAYERS)]
    x = _layer_inputs()
    f_ref, y_ref = _ct_clt_numpy(layers, x)
    assert 0.05 < fired_fraction(torch.from_numpy(f_ref)) < 0.95
    assert_matches(clt.encode(_flat(x)), _flat(f_ref), "circuit-tracer CLT encode")
    assert_matches(clt(_flat(x)), _flat(y_ref), "circuit-tracer CLT forward")
    out = saelab.save(clt, tmp_path / "saved")  # SAELens cannot hold several sites
    assert formats.detect(out).name == "saelab-dictionary"
    assert torch.equal(saelab.load(out)(_flat(x)), clt(_flat(x)))
    with torch.no_grad():
        clt.b_in.add_(torch.randn_like(clt.b_in))  # a saelab CLT with an input bias: folded when written
    formats.get_format("circuit_tracer").write(clt, tmp_path / "written")
    assert_matches(saelab.load(tmp_path / "written")(_flat(x)), clt(_flat(x)).detach(), "CLT written by saelab")


@pytest.mark.parametrize("fmt", ["circuit_tracer", "gemma_scope_2"])
def test_batchtopk_transcoders_are_written_in_their_inference_form(fmt, tmp_path):
    for architecture in ("batchtopk", "matryoshka"):
        cfg = {"architecture": architecture, "d_in": CT_D, "d_sae": D_SAE, "k": 3, "seed": 7}
        cfg.update(site="blocks.1.hook_resid_mid", write_site="blocks.1.hook_mlp_out", skip=True)
        if architecture == "matryoshka":
            cfg["prefixes"] = [5, D_SAE]
        sae = saelab.create(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p))
            sae.threshold.fill_(1.0)
        sae.eval()
        x = inputs(256, CT_D)
        assert 0.05 < fired_fraction(sae.encode(x)) < 0.95
        formats.get_format(fmt).write(sae, tmp_path / architecture)
        back = saelab.load(tmp_path / architecture)
        assert back.architecture == "jumprelu" and back.cfg.skip
        assert_matches(back(x), sae(x).detach(), f"{architecture} transcoder written as {fmt}")


def test_circuit_tracer_bad_files(tmp_path):
    layers = _write_ct_clt(tmp_path / "clt", jump=True)
    (tmp_path / "clt" / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileFormatError, match=r"W_dec_1\.safetensors is missing"):
        saelab.load(tmp_path / "clt")
    save_file({"W_dec_1": layers[1]["W_dec_1"][:, :1].contiguous()}, str(tmp_path / "clt" / "W_dec_1.safetensors"))
    with pytest.raises(FileFormatError, match=r"W_dec_1\.safetensors: 'W_dec_1' has shape \(15, 1, 5\)"):
        saelab.load(tmp_path / "clt")
    path = tmp_path / "clt" / "W_enc_2.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=r"W_enc_2\.safetensors.*truncated"):
        saelab.load(tmp_path / "clt")
    _write_ct_set(tmp_path / "set", jump=True, skip=False)
    hub = ["hf://org/repo/layer_0.safetensors", "hf://org/repo/layer_1.safetensors?revision=main"]
    config = {"model_kind": "transcoder_set", **CT_HOOKS, "transcoders": hub}
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump(config))
    assert saelab.load(tmp_path / "set" / "layer_1.safetensors").cfg.site == "blocks.1.hook_resid_mid"  # a snapshot
    with pytest.raises(FileFormatError, match="not one of the layer files"):
        saelab.load(tmp_path / "set" / "layer_2.safetensors")  # not listed in this config
    hub[1] = "hf://org/repo/sub/layer_7.safetensors"
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileFormatError, match="layer_7.safetensors, which is not in .* never downloads"):
        saelab.load(tmp_path / "set")
    config.update(model_kind="cross_layer_transcoder")
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FileFormatError, match="Gemma Scope 2's CLT layout"):
        saelab.load(tmp_path / "set")
    (tmp_path / "set" / "config.yaml").write_text(yaml.safe_dump({"model_kind": "sparse_thing", **CT_HOOKS}))
    with pytest.raises(FileFormatError, match="model_kind 'sparse_thing'"):
        saelab.load(tmp_path / "set")
    topk = saelab.create(
        {"architecture": "topk", "d_in": 5, "d_sae": 15, "site": "blocks.0.a", "write_site": "blocks.0.b"}
    )
    with pytest.raises(FileFormatError, match="'topk' transcoder"):
        formats.get_format("circuit_tracer").write(topk, tmp_path / "topk")


def test_convert_refuses_a_clt_and_a_topk_transcoder_to_saelens_and_names_the_layout(tmp_path, capsys):
    _write_ct_clt(tmp_path / "clt", jump=True)
    assert main(["convert", str(tmp_path / "clt"), "--out", str(tmp_path / "out")]) == 2
    assert "--to saelab-dictionary" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "clt"), "--out", str(tmp_path / "out"), "--to", "saelab-dictionary"]) == 0
    assert saelab.load(tmp_path / "out").architecture == "clt_jumprelu"
    _sparsify_transcoder(skip=False).save_to_disk(tmp_path / "layers.1.mlp")  # SAELens has no TopK transcoder
    assert main(["convert", str(tmp_path / "layers.1.mlp"), "--out", str(tmp_path / "out2")]) == 2
    assert "--to saelab-dictionary" in capsys.readouterr().err


CT_PYTHON = Path(os.environ.get("SAELAB_CIRCUIT_TRACER_PYTHON", "/tmp/ct-venv/bin/python"))


@pytest.mark.slow
def test_circuit_tracer_matches_the_library(tmp_path):
    """circuit-tracer 0.5.0 pins transformers <= 4.57.3 and huggingface-hub < 1, so it runs in its own
    environment: python3 -m venv /tmp/ct-venv && /tmp/ct-venv/bin/pip install -c constraints.txt
    circuit-tracer==0.5.0. Files written by hand and by saelab's writer are both checked."""
    if not CT_PYTHON.exists():
        pytest.skip(f"no circuit-tracer environment at {CT_PYTHON} (see this test's docstring to make one)")
    _write_ct_set(tmp_path / "set_jump_skip", jump=True, skip=True)
    _write_ct_set(tmp_path / "set_relu", jump=False, skip=False)
    _write_ct_clt(tmp_path / "clt_jump", jump=True)
    _write_ct_clt(tmp_path / "clt_relu", jump=False)
    theirs = saelab.load(tmp_path / "clt_jump")  # saelab's writers: a CLT and a set, with input biases
    with torch.no_grad():
        theirs.b_in.add_(torch.randn_like(theirs.b_in))
    formats.get_format("circuit_tracer").write(theirs, tmp_path / "clt_saelab")
    for layer in range(CT_LAYERS):
        tc = saelab.load(tmp_path / "set_jump_skip" / f"layer_{layer}.safetensors")
        with torch.no_grad():
            tc.b_in.add_(torch.randn_like(tc.b_in))
        formats.get_format("circuit_tracer").write(tc, tmp_path / "set_saelab")
    x = _layer_inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    folders = ["set_jump_skip", "set_relu", "clt_jump", "clt_relu", "clt_saelab", "set_saelab"]
    run_reference(
        CT_PYTHON,
        "circuit_tracer_reference.py",
        tmp_path / "x.npy",
        tmp_path / "ref.npz",
        *(tmp_path / f for f in folders),
    )
    with np.load(tmp_path / "ref.npz") as ref:
        for name in folders:
            f_ref, y_ref = ref[f"{name}/f"], ref[f"{name}/y"]
            assert 0.05 < fired_fraction(torch.from_numpy(f_ref)) < 0.95, name
            if name.startswith("clt"):
                clt = saelab.load(tmp_path / name)
                assert_matches(clt.encode(_flat(x)), _flat(f_ref), f"{name} encode vs circuit-tracer")
                assert_matches(clt(_flat(x)), _flat(y_ref), f"{name} forward vs circuit-tracer")
                continue
            for layer in range(CT_LAYERS):
                sae = saelab.load(tmp_path / name / f"layer_{layer}.safetensors")
                assert_matches(sae.encode(x[layer]), f_ref[layer], f"{name} layer {layer} encode vs circuit-tracer")
                assert_matches(sae(x[layer]), y_ref[layer], f"{name} layer {layer} forward vs circuit-tracer")
