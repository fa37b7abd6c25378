"""SAEBench compatibility: the attribute contract its evals read, and (where an environment with
sae-bench 0.6.0 exists) its core eval run on a saelab SAE with a tiny random model.

sae-bench pins numpy<2 and pulls a CUDA-built torchvision, so it lives in its own environment:
    python3 -m venv /tmp/saebench-venv
    /tmp/saebench-venv/bin/pip install -c constraints.txt sae-bench==0.6.0
    /tmp/saebench-venv/bin/pip uninstall -y torchvision   # its CUDA build breaks transformers' imports on CPU torch
Set SAELAB_SAEBENCH_PYTHON to use another interpreter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.io.saebench import for_saebench
from tests.conftest import small_config
from tests.io.test_formats import run_reference

ROOT = Path(__file__).resolve().parents[2]
SAEBENCH_PYTHON = Path(os.environ.get("SAELAB_SAEBENCH_PYTHON", "/tmp/saebench-venv/bin/python"))


def test_view_exposes_what_saebench_reads(arch):
    sae = saelab.create(small_config(arch))
    if sae.uses_tokens:
        with pytest.raises(ConfigError, match="token ids"):
            for_saebench(sae, "m", hook_layer=0)
        return
    view = for_saebench(sae, model_name="tiny", hook_layer=2, context_size=32)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    assert view.W_enc.shape == (d_in, d_sae) and view.W_dec.shape == (d_sae, d_in)
    assert view.b_enc.shape == (d_sae,) and view.b_dec.shape == (d_in,)
    assert torch.equal(view.W_dec, sae.W_dec)
    if isinstance(sae.W_dec, torch.nn.Parameter):  # archetypal SAEs compute theirs
        assert view.W_dec is sae.W_dec  # the SAE's own tensor, not a copy
    assert view.device == torch.device("cpu") and view.dtype == torch.float32
    cfg = view.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.hook_layer, cfg.hook_name) == (d_in, d_sae, 2, "blocks.2.hook_resid_post")
    assert cfg.model_name == "tiny" and cfg.context_size == 32 and cfg.dtype == "float32"
    assert cfg.architecture_str == {"relu": "standard"}.get(arch, arch)
    cfg.metadata = object()  # SAEBench adds fields while standardising
    assert cfg.to_dict()["d_sae"] == d_sae
    x = torch.randn(3, 7, d_in)
    with torch.no_grad():
        f = view.encode(x)
        assert f.shape == (3, 7, d_sae)
        assert torch.equal(f.reshape(-1, d_sae), sae.encode(x.reshape(-1, d_in)))
        assert view(x).shape == x.shape
        assert torch.allclose(view.decode(f), view(x))
    view.to(dtype=torch.float64)
    assert view.dtype == torch.float64 and view.cfg.dtype == "float64" and sae.W_dec.dtype == torch.float64
    if arch == "gated":
        assert view.b_mag is sae.b_mag and view.b_enc is sae.b_gate


def test_hook_name_comes_from_the_loaded_file(tmp_path):
    sae = saelab.create(small_config("jumprelu"))
    sae.provenance = {"source_format": "gemma_scope_1", "hook_name": "blocks.5.hook_mlp_out"}
    assert for_saebench(sae, "m", hook_layer=5).cfg.hook_name == "blocks.5.hook_mlp_out"
    sae.provenance = {"source_format": "sparsify", "hook_name": "layers.5"}  # not a TransformerLens name
    assert for_saebench(sae, "m", hook_layer=5).cfg.hook_name == "blocks.5.hook_resid_post"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_saebench_core_eval_accepts_a_saelab_sae(arch):
    if not SAEBENCH_PYTHON.exists():
        pytest.skip(f"no sae-bench environment at {SAEBENCH_PYTHON} (see this file's docstring to make one)")
    stdout = run_reference(
        SAEBENCH_PYTHON, "saebench_core_eval.py", arch, env={"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    )
    out = json.loads(stdout.strip().splitlines()[-1])
    m = out["metrics"]
    assert set(m) >= {"model_behavior_preservation", "reconstruction_quality", "shrinkage", "sparsity"}
    assert out["n_feature_metrics"] >= 5  # per-latent density and weight-based metrics came back
    for value in (
        m["sparsity"]["l0"],
        m["reconstruction_quality"]["mse"],
        m["model_behavior_preservation"]["kl_div_with_sae"],
    ):
        assert value == value and value >= 0  # finite numbers, not NaN
    if arch == "topk":
        assert m["sparsity"]["l0"] == pytest.approx(4.0)  # SAEBench counts exactly k active latents
        assert out["saelab_l0"] == pytest.approx(4.0)
    else:
        assert 0 < m["sparsity"]["l0"] < 48
    assert sys.executable != str(SAEBENCH_PYTHON)  # the eval ran in its own environment
