"""Other libraries' SAE files: tiny random files in each format (d_in 5, d_sae 15, so any
transposition fails), loaded by saelab and compared with the library's own forward pass where it
installs (sparsify, sae-lens) and otherwise with a NumPy forward of that format written here.
Every format then round-trips through the SAELens v6 layout, and bad files fail by name."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saelab
from saelab.cli import main
from saelab.errors import FileFormatError
from saelab.io import formats

D_IN, D_SAE = 5, 15


def reference_library(name: str):
    """The reference library; CI installs the test extra, so there a missing one fails."""
    if os.environ.get("CI"):
        return __import__(name)
    return pytest.importorskip(name)


def run_reference(python: Path, script: str, *args, env: dict[str, str] | None = None) -> str:
    """Run `script` (a file beside this one) with a reference library's own interpreter, one
    thread; it must succeed. Returns its stdout."""
    done = subprocess.run(
        [str(python), "-W", "ignore", str(Path(__file__).with_name(script)), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_matches(ours: torch.Tensor, ref, what: str) -> None:
    """Equal within 1e-5 relative to the largest entry of the reference."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    ours = ours.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max() / scale
    if os.environ.get("SAELAB_INTEROP_ERRORS"):  # where the measured errors go (docs/results/interop.md)
        with open(os.environ["SAELAB_INTEROP_ERRORS"], "a") as log:
            log.write(json.dumps({"check": what, "max_rel_error": float(err)}) + "\n")
    assert err <= 1e-5, f"{what}: max error {err:.3g} relative to the largest entry"


def inputs(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN) * 2.0


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def round_trip(sae, x: torch.Tensor, tmp_path: Path, source_format: str) -> None:
    """SAELens v6 save -> load keeps the encodings and the provenance record."""
    out = saelab.save(sae, tmp_path / "converted")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["saelab_provenance"]["source_format"] == source_format
    back = saelab.load(out)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))
    assert back.provenance["converted_from"]["format"] == source_format
    assert back.provenance.get("hook_name") == sae.provenance.get("hook_name")


def fired_fraction(f: torch.Tensor) -> float:
    return float((f != 0).float().mean())


# ------------------------------------------------------------------------------------------ sparsify


def _sparsify_coder(k: int = 4):
    sparsify = reference_library("sparsify")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=k))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p))
    return coder


def _sparsify_dense(coder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
    return torch.zeros(x.shape[0], D_SAE).scatter_(1, idx, acts)


def test_sparsify_sae_matches_sparsify(tmp_path):
    coder = _sparsify_coder()
    coder.save_to_disk(tmp_path / "layers.3")
    sae = saelab.load(tmp_path / "layers.3")
    x = inputs()
    assert sae.architecture == "topk" and sae.cfg.k == 4
    assert_matches(sae.encode(x), _sparsify_dense(coder, x), "sparsify encode")
    with torch.no_grad():
        assert_matches(sae(x), coder(x).sae_out, "sparsify forward")
    assert sae.provenance["hook_name"] == "layers.3"
    round_trip(sae, x, tmp_path, "sparsify")


def test_sparsify_root_folder_and_transcode_flag(tmp_path):
    coder = _sparsify_coder()
    coder.save_to_disk(tmp_path / "root" / "layers.1")
    assert saelab.load(tmp_path / "root").provenance["hook_name"] == "layers.1"  # one hookpoint: that one
    coder.save_to_disk(tmp_path / "root" / "layers.2")
    with pytest.raises(FileFormatError, match=r"layers\.1, layers\.2"):
        saelab.load(tmp_path / "root")
    cfg_path = tmp_path / "root" / "layers.2" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["transcode"] = True  # the same tensors read as a transcoder of the module's input (tests in
    cfg_path.write_text(json.dumps(cfg))  # test_transcoder_formats.py compare it with sparsify)
    assert saelab.load(tmp_path / "root" / "layers.2").cfg.write_site == "layers.2"


def test_saelab_topk_written_as_sparsify_loads_in_sparsify(tmp_path):
    sparsify = reference_library("sparsify")
    sae = saelab.create({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 3})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    formats.get_format("sparsify").write(sae.eval(), tmp_path / "layers.0")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.0")
    x = inputs()
    assert_matches(sae.encode(x), _sparsify_dense(theirs, x), "sparsify reads saelab")


# ------------------------------------------------------------------------------- dictionary_learning


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _dl_state(dict_class: str) -> dict[str, torch.Tensor]:
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        s = {
            "encoder.weight": _randn(D_SAE, D_IN),
            "encoder.bias": _randn(D_SAE),
            "decoder.weight": _randn(D_IN, D_SAE),
        }
        s["bias" if dict_class == "AutoEncoder" else "decoder.bias"] = _randn(D_IN)
        return s
    if dict_class == "GatedAutoEncoder":
        return {
            "decoder_bias": _randn(D_IN),
            "encoder.weight": _randn(D_SAE, D_IN),
            "r_mag": 0.5 * _randn(D_SAE),
            "gate_bias": _randn(D_SAE),
            "mag_bias": _randn(D_SAE),
            "decoder.weight": _randn(D_IN, D_SAE),
        }
    if dict_class == "JumpReluAutoEncoder":
        return {
            "W_enc": _randn(D_IN, D_SAE),
            "b_enc": _randn(D_SAE),
            "W_dec": _randn(D_SAE, D_IN),
            "b_dec": _randn(D_IN),
            "threshold": torch.rand(D_SAE) * 2,
        }
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            "k": torch.tensor(4, dtype=torch.int),
            "threshold": torch.tensor(1.5),
            "decoder.weight": _randn(D_IN, D_SAE),
            "encoder.weight": _randn(D_SAE, D_IN),
            "encoder.bias": _randn(D_SAE),
            "b_dec": _randn(D_IN),
        }
    assert dict_class == "MatryoshkaBatchTopKSAE"
    return {
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(1.5),
        "group_sizes": torch.tensor([3, 5, 7]),
        "W_enc": _randn(D_IN, D_SAE),
        "b_enc": _randn(D_SAE),
        "W_dec": _randn(D_SAE, D_IN),
        "b_dec": _randn(D_IN),
    }


def _dl_numpy(dict_class: str, s: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """dictionary_learning's encode/decode for each class, in NumPy float64."""
    x = np64(x)
    n = {k: np64(v) for k, v in s.items()}
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    if dict_class == "AutoEncoder":
        f = relu((x - n["bias"]) @ n["encoder.weight"].T + n["encoder.bias"])
        return f, f @ n["decoder.weight"].T + n["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(x @ n["encoder.weight"].T + n["encoder.bias"])
        return f, f @ n["decoder.weight"].T + n["decoder.bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - n["decoder_bias"]) @ n["encoder.weight"].T
        gate = (x_enc + n["gate_bias"]) > 0
        f = gate * relu(np.exp(n["r_mag"]) * x_enc + n["mag_bias"])
        return f, f @ n["decoder.weight"].T + n["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ n["W_enc"] + n["b_enc"]
        f = relu(pre * (pre > n["threshold"]))
        return f, f @ n["W_dec"] + n["b_dec"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - n["b_dec"]) @ n["encoder.weight"].T + n["encoder.bias"])
        if dict_class == "AutoEncoderTopK":
            kth = np.sort(post, axis=1)[:, -int(n["k"])][:, None]
            f = post * (post >= kth)
        else:
            f = post * (post > n["threshold"])
        return f, f @ n["decoder.weight"].T + n["b_dec"]
    post = relu((x - n["b_dec"]) @ n["W_enc"] + n["b_enc"])
    f = post * (post > n["threshold"])
    return f, f @ n["W_dec"] + n["b_dec"]


DL_CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderNew": "relu",
    "GatedAutoEncoder": "gated",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka",
}


def _write_dl(folder: Path, dict_class: str, with_config: bool = True) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    state = _dl_state(dict_class)
    torch.save(state, folder / "ae.pt")
    if with_config:
        trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 2, "lm_name": "tiny"}
        trainer["submodule_name"] = "resid_post_layer_2"
        (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return state


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_matches_numpy(dict_class, tmp_path):
    state = _write_dl(tmp_path / "ae", dict_class)
    sae = saelab.load(tmp_path / "ae")
    assert sae.architecture == DL_CLASSES[dict_class]
    x = inputs(256)
    f_ref, x_hat_ref = _dl_numpy(dict_class, state, x)
    assert 0.02 < fired_fraction(torch.from_numpy(f_ref)) < 0.98  # the thresholds bite on these inputs
    assert_matches(sae.encode(x), f_ref, f"{dict_class} encode")
    assert_matches(sae(x), x_hat_ref, f"{dict_class} forward")
    assert sae.provenance["hook_name"] == "resid_post_layer_2" and sae.provenance["dict_class"] == dict_class
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert sae.cfg.prefixes == [3, 8, 15]
    round_trip(sae, x, tmp_path, "dictionary_learning")


DL_PYTHON = Path(os.environ.get("SAELAB_DICTIONARY_LEARNING_PYTHON", "/tmp/dl-venv/bin/python"))


@pytest.mark.slow
def test_dictionary_learning_matches_the_library(tmp_path):
    """dictionary-learning 0.1.0 pulls nnsight 0.3, numba and a CUDA-built torchvision, so it runs in
    its own environment: python3 -m venv /tmp/dl-venv && /tmp/dl-venv/bin/pip install -c
    constraints.txt dictionary-learning==0.1.0 && /tmp/dl-venv/bin/pip uninstall -y torchvision"""
    if not DL_PYTHON.exists():
        pytest.skip(f"no dictionary-learning environment at {DL_PYTHON} (see this test's docstring to make one)")
    folders = [tmp_path / name for name in DL_CLASSES]
    for folder in folders:
        _write_dl(folder, folder.name)
    x = inputs(256)
    np.save(tmp_path / "x.npy", x.numpy())
    run_reference(DL_PYTHON, "dictionary_learning_reference.py", tmp_path / "x.npy", tmp_path / "ref.npz", *folders)
    with np.load(tmp_path / "ref.npz") as ref:
        for folder in folders:
            sae = saelab.load(folder)
            f_ref = ref[f"{folder.name}/f"]
            assert 0.02 < fired_fraction(torch.from_numpy(f_ref)) < 0.98, folder.name
            assert_matches(sae.encode(x), f_ref, f"{folder.name} encode vs dictionary_learning")
            assert_matches(sae(x), ref[f"{folder.name}/x_hat"], f"{folder.name} forward vs dictionary_learning")


def test_dictionary_learning_class_from_tensor_names(tmp_path):
    _write_dl(tmp_path / "gated", "GatedAutoEncoder", with_config=False)
    assert saelab.load(tmp_path / "gated").architecture == "gated"
    _write_dl(tmp_path / "topk", "BatchTopKSAE", with_config=False)
    with pytest.raises(FileFormatError, match="AutoEncoderTopK or BatchTopKSAE"):
        saelab.load(tmp_path / "topk")


# -------------------------------------------------------------------------------------- Gemma Scope


def _jumprelu_tensors() -> dict[str, torch.Tensor]:
    return {
        "W_enc": _randn(D_IN, D_SAE),
        "W_dec": _randn(D_SAE, D_IN),
        "b_enc": _randn(D_SAE),
        "b_dec": _randn(D_IN),
        "threshold": torch.rand(D_SAE) * 2,
    }


def _jumprelu_numpy(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gemma Scope's JumpReLU: no b_dec subtracted; f = pre * (pre > threshold), pre from ReLU."""
    n = {k: np64(v) for k, v in t.items()}
    pre = np64(x) @ n["W_enc"] + n["b_enc"]
    f = (pre > n["threshold"]) * np.maximum(pre, 0)
    return f, f @ n["W_dec"] + n["b_dec"]


def test_gemma_scope_1_matches_numpy_and_reads_the_path(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_15" / "average_l0_4"
    folder.mkdir(parents=True)
    t = _jumprelu_tensors()
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = saelab.load(folder / "params.npz")
    x = inputs(256)
    f_ref, x_hat_ref = _jumprelu_numpy(t, x)
    assert 0.02 < fired_fraction(torch.from_numpy(f_ref)) < 0.98
    assert_matches(sae.encode(x), f_ref, "gemma scope 1 encode")
    assert_matches(sae(x), x_hat_ref, "gemma scope 1 forward")
    assert sae.provenance["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.provenance["average_l0"] == 4 and sae.provenance["layer"] == 3
    round_trip(sae, x, tmp_path, "gemma_scope_1")


def test_gemma_scope_1_embedding_scaling_and_width_check(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_15" / "average_l0_4"
    folder.mkdir(parents=True)
    t = _jumprelu_tensors()
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = saelab.load(folder)
    x = inputs(256)
    s = math.sqrt(D_IN)
    f_ref, _ = _jumprelu_numpy(t, x / s)  # the SAE reads inputs sqrt(d) smaller than hook_embed
    assert_matches(sae.encode(x), f_ref, "gemma scope embedding encode")
    assert_matches(sae.decode(sae.encode(x)), f_ref @ (np64(t["W_dec"]) * s) + np64(t["b_dec"]), "embedding decode")
    assert sae.provenance["hook_name"] == "hook_embed" and "W_enc" in sae.provenance["folded_scaling"]
    bad = tmp_path / "layer_1" / "width_16k" / "average_l0_9"
    bad.mkdir(parents=True)
    np.savez(bad / "params.npz", **{k: v.numpy() for k, v in t.items()})
    with pytest.raises(FileFormatError, match="width 16384 but W_enc has 15"):
        saelab.load(bad)


def _write_gemma_scope_2(folder: Path, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    t = _jumprelu_tensors()
    save_file({k.lower(): v for k, v in t.items()}, str(folder / "params.safetensors"))
    cfg = cfg or {
        "architecture": "jump_relu",
        "type": "sae",
        "width": D_SAE,
        "l0": 4,
        "model_name": "gemma-v3-tiny",
        "hf_hook_point_in": "model.layers.2.output",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return t


def test_gemma_scope_2_matches_numpy(tmp_path):
    t = _write_gemma_scope_2(tmp_path / "resid_post" / "layer_2_width_15_l0_small")
    sae = saelab.load(tmp_path / "resid_post" / "layer_2_width_15_l0_small")
    x = inputs(256)
    f_ref, x_hat_ref = _jumprelu_numpy(t, x)
    assert_matches(sae.encode(x), f_ref, "gemma scope 2 encode")
    assert_matches(sae(x), x_hat_ref, "gemma scope 2 forward")
    assert sae.provenance["hook_name"] == "model.layers.2.output"
    round_trip(sae, x, tmp_path, "gemma_scope_2")
    formats.get_format("gemma_scope_2").write(sae, tmp_path / "again")
    again = saelab.load(tmp_path / "again")
    assert torch.equal(again.encode(x), sae.encode(x)) and again.provenance["hook_name"] == "model.layers.2.output"


def test_gemma_scope_2_transcoder_config_makes_a_transcoder(tmp_path):
    cfg = {
        "architecture": "jump_relu",
        "type": "transcoder",
        "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output",
    }
    _write_gemma_scope_2(tmp_path / "tc", cfg)  # test_transcoder_formats.py checks its forward
    sae = saelab.load(tmp_path / "tc")
    assert (sae.cfg.site, sae.cfg.write_site) == (cfg["hf_hook_point_in"], cfg["hf_hook_point_out"])


# -------------------------------------------------------------------------------------- Llama Scope

NORM_IN, NORM_OUT, THETA = 7.5, 7.5, 0.4


def _write_llama_scope(folder: Path, **hp_extra) -> tuple[dict, dict[str, torch.Tensor]]:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    hp = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.3.hook_resid_post",
        "hook_point_out": "blocks.3.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": THETA,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_OUT},
        "apply_decoder_bias_to_pre_encoder": False,
        "use_decoder_bias": True,
        "top_k": 4,
        **hp_extra,
    }
    t = {
        "encoder.weight": _randn(D_SAE, D_IN),
        "encoder.bias": _randn(D_SAE),
        "decoder.weight": _randn(D_IN, D_SAE),
        "decoder.bias": _randn(D_IN),
    }
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}  # as released
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return hp, t


def _llama_scope_numpy(hp: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Llama Scope's forward on raw x: scale to the training norm, JumpReLU at threshold*s_in
    (the released threshold's units), then undo the output normalisation."""
    n = {k: np64(v) for k, v in t.items()}
    s_in = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["out"]
    pre = (np64(x) * s_in) @ n["encoder.weight"].T + n["encoder.bias"]
    f = pre * (pre > hp["jump_relu_threshold"] * s_in)
    return f, (f @ n["decoder.weight"].T + n["decoder.bias"]) / s_out


def test_llama_scope_matches_numpy_with_the_norm_folded(tmp_path):
    hp, t = _write_llama_scope(tmp_path / "L3R-8x")
    sae = saelab.load(tmp_path / "L3R-8x")
    x = inputs(256) * 3
    f_ref, x_hat_ref = _llama_scope_numpy(hp, t, x)
    assert 0.02 < fired_fraction(torch.from_numpy(f_ref)) < 0.98
    assert_matches(sae.encode(x), f_ref, "llama scope encode")
    assert_matches(sae(x), x_hat_ref, "llama scope forward")
    s_in = math.sqrt(D_IN) / NORM_IN
    folded = sae.provenance["folded_scaling"]
    assert folded["input_scale"] == pytest.approx(s_in) and folded["threshold_scale"] == pytest.approx(s_in)
    assert torch.allclose(sae.threshold, torch.full((D_SAE,), THETA * s_in))
    assert sae.provenance["source_dtype"] == "bfloat16"
    round_trip(sae, x, tmp_path, "llama_scope")


def test_llama_scope_matches_sae_lens_own_loader(tmp_path, monkeypatch):
    reference_library("sae_lens")
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.loading import pretrained_sae_loaders as loaders

    hp, _ = _write_llama_scope(tmp_path / "L3R-8x")

    def local_download(repo_id, filename, subfolder=None, **kwargs):  # the hub, served from tmp_path
        return str(tmp_path / (subfolder or "") / filename)

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    cfg, state, _ = loaders.llama_scope_sae_huggingface_loader(
        "fnlp/tiny", "L3R-8x", device="cpu", cfg_overrides={"dtype": "float32"}
    )
    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    theirs.load_state_dict({k: v.float() for k, v in state.items()})
    theirs.fold_activation_norm_scaling_factor(math.sqrt(D_IN) / NORM_IN)  # what SAE.from_pretrained does
    ours = saelab.load(tmp_path / "L3R-8x")
    x = inputs(256) * 3
    with torch.no_grad():
        assert_matches(ours.encode(x), theirs.encode(x), "llama scope vs SAELens encode")
        assert_matches(ours(x), theirs(x), "llama scope vs SAELens forward")


def test_llama_scope_topk_and_transcoder(tmp_path):
    hp, t = _write_llama_scope(tmp_path / "topk", act_fn="topk")
    sae = saelab.load(tmp_path / "topk")
    assert sae.architecture == "topk" and sae.cfg.k == 4
    x = inputs(64)
    s_in = math.sqrt(D_IN) / NORM_IN
    pre = (np64(x) * s_in) @ np64(t["encoder.weight"]).T + np64(t["encoder.bias"])
    kth = np.sort(pre, axis=1)[:, -4][:, None]
    assert_matches(sae.encode(x), np.maximum(pre, 0) * (pre >= kth), "llama scope topk encode")
    _write_llama_scope(tmp_path / "tc", hook_point_out="blocks.3.hook_mlp_out")  # see test_transcoder_formats.py
    assert saelab.load(tmp_path / "tc").cfg.write_site == "blocks.3.hook_mlp_out"


# --------------------------------------------------------------------------------- every format: bad files


def _one_of_each(tmp_path: Path) -> dict[str, Path]:
    """A valid folder per format and its weights file."""
    _sparsify_coder().save_to_disk(tmp_path / "sparsify" / "layers.0")
    _write_dl(tmp_path / "dl", "AutoEncoder")
    gs1 = tmp_path / "layer_0" / "width_15" / "average_l0_3"
    gs1.mkdir(parents=True)
    np.savez(gs1 / "params.npz", **{k: v.numpy() for k, v in _jumprelu_tensors().items()})
    _write_gemma_scope_2(tmp_path / "gs2")
    _write_llama_scope(tmp_path / "ls")
    saelab.save(saelab.create({"architecture": "relu", "d_in": D_IN, "d_sae": D_SAE}), tmp_path / "saelens")
    ct = tmp_path / "ct"  # a circuit-tracer cross-layer transcoder of one layer
    ct.mkdir()
    (ct / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: a\nfeature_output_hook: b\n"
    )
    save_file(
        {"W_enc_0": _randn(D_SAE, D_IN), "b_enc_0": _randn(D_SAE), "b_dec_0": _randn(D_IN)},
        str(ct / "W_enc_0.safetensors"),
    )
    save_file({"W_dec_0": _randn(D_SAE, 1, D_IN)}, str(ct / "W_dec_0.safetensors"))
    crosscoder = {"architecture": "relu", "d_in": 2 * D_IN, "d_sae": D_SAE, "site": ["layers.0", "layers.1"]}
    saelab.save(saelab.create(crosscoder), tmp_path / "crosscoder")
    return {
        "saelab-dictionary": tmp_path / "crosscoder" / "dictionary.safetensors",
        "sparsify": tmp_path / "sparsify" / "layers.0" / "sae.safetensors",
        "dictionary_learning": tmp_path / "dl" / "ae.pt",
        "gemma_scope_1": gs1 / "params.npz",
        "gemma_scope_2": tmp_path / "gs2" / "params.safetensors",
        "llama_scope": tmp_path / "ls" / "checkpoints" / "final.safetensors",
        "saelens": tmp_path / "saelens" / "sae_weights.safetensors",
        "circuit_tracer": ct / "W_enc_0.safetensors",
    }


def test_detection_truncation_and_unknown_formats(tmp_path):
    files = _one_of_each(tmp_path)
    assert set(files) == set(formats.list_formats())
    for name, weights in files.items():
        folder = weights.parent.parent if name == "llama_scope" else weights.parent
        assert formats.detect(folder).name == name
        weights.write_bytes(weights.read_bytes()[:200])
        with pytest.raises(FileFormatError, match="truncated") as err:
            saelab.load(folder)
        assert weights.name in str(err.value), f"{name}: the error must name the file"
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileFormatError, match="no known SAE format.*weights.bin"):
        saelab.load(tmp_path / "unknown")


def test_wrong_shapes_name_the_file_and_the_tensor(tmp_path):
    gs2 = tmp_path / "gs2"
    _write_gemma_scope_2(gs2)
    t = {"w_enc": _randn(D_IN, D_SAE), "w_dec": _randn(D_IN, D_SAE), "b_enc": _randn(D_SAE)}
    t.update(b_dec=_randn(D_IN), threshold=_randn(D_SAE))
    save_file(t, str(gs2 / "params.safetensors"))  # W_dec transposed
    with pytest.raises(FileFormatError, match=r"params\.safetensors: 'w_dec' has shape \(5, 15\)"):
        saelab.load(gs2)
    hp, _ = _write_llama_scope(tmp_path / "ls")
    hp["d_sae"] = 16
    (tmp_path / "ls" / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(FileFormatError, match=r"final\.safetensors: 'encoder\.weight' has shape \(15, 5\)"):
        saelab.load(tmp_path / "ls")
    state = _write_dl(tmp_path / "dl", "JumpReluAutoEncoder")
    state["threshold"] = torch.rand(D_SAE + 1)
    torch.save(state, tmp_path / "dl" / "ae.pt")
    with pytest.raises(FileFormatError, match=r"ae\.pt.*'threshold' has shape \(16,\)"):
        saelab.load(tmp_path / "dl")


def test_convert_command_writes_saelens_and_records_the_source(tmp_path, capsys):
    hp, t = _write_llama_scope(tmp_path / "L3R-8x")
    assert main(["convert", str(tmp_path / "L3R-8x"), "--out", str(tmp_path / "out")]) == 0
    assert "llama_scope -> saelens" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["saelab_provenance"]["folded_scaling"]["threshold_scale"] == pytest.approx(
        math.sqrt(D_IN) / NORM_IN
    )
    x = inputs(64)
    assert_matches(saelab.load(tmp_path / "out").encode(x), _llama_scope_numpy(hp, t, x)[0], "converted")
    _write_dl(tmp_path / "dl", "GatedAutoEncoder")
    assert (
        main(["convert", str(tmp_path / "dl"), "--out", str(tmp_path / "out2"), "--from", "dictionary_learning"]) == 0
    )
    assert main(["convert", str(tmp_path / "dl"), "--out", str(tmp_path / "out3"), "--from", "gemma_scope_2"]) == 2
    assert "params.safetensors" in capsys.readouterr().err
    _write_dl(tmp_path / "dl_topk", "AutoEncoderTopK")
    assert main(["convert", str(tmp_path / "dl_topk"), "--out", str(tmp_path / "layers.2"), "--to", "sparsify"]) == 0
    x = inputs(64)
    assert torch.equal(saelab.load(tmp_path / "layers.2").encode(x), saelab.load(tmp_path / "dl_topk").encode(x))
