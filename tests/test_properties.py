"""Property-based tests: configs, cfg.json files and checkpoint state, valid and corrupted. Either
saelab accepts the input, or it raises its own error (a SaelabError) with one line; never another
exception type."""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saelab
from saelab.errors import SaelabError
from saelab.run import RunConfig
from saelab.train import Trainer
from saelab.train import checkpoint as ckpt
from tests.conftest import small_config
from tests.train.test_trainer import FAST, toy_source

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON-ish values of every kind a hand-edited file or a typo can hold
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def accepted_or_one_line(fn, *args):
    """Run fn; a failure must be a SaelabError with a one-line message."""
    try:
        return fn(*args)
    except SaelabError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


# ---------------------------------------------------------------------------- run configs
VALID = {
    "sae": {"architecture": "topk", "d_in": 12, "d_sae": 24, "k": 3},
    "train": {"steps": 20, "lr": 0.001, "batch": None},
    "source": {"type": "world", "batch_size": 32, "seed": 0, "world": {"d": 12}},
    "eval": {"batches": 4},
}
PATHS = [
    ("sae",),
    ("sae", "architecture"),
    ("sae", "d_in"),
    ("sae", "k"),
    ("train",),
    ("train", "steps"),
    ("train", "lr"),
    ("train", "adam_betas"),
    ("train", "device"),
    ("train", "progress"),
    ("source",),
    ("source", "type"),
    ("source", "batch_size"),
    ("source", "seed"),
    ("source", "world"),
    ("eval", "batches"),
    ("eval_source",),
    ("saes",),
    ("out",),
]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(PATHS), values | st.just("DELETE")), min_size=1, max_size=3))
def test_any_edit_of_a_run_config_parses_or_names_the_problem(edits):
    cfg = copy.deepcopy(VALID)
    del cfg["train"]["batch"]
    for path, value in edits:
        node = cfg
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            if value == "DELETE":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    parsed = accepted_or_one_line(RunConfig.parse, cfg)
    if parsed is not None:  # accepted: every typed field really has its type
        assert isinstance(parsed.train.steps, int) and not isinstance(parsed.train.steps, bool)
        assert isinstance(parsed.source.batch_size, int) and not isinstance(parsed.source.batch_size, bool)


# ---------------------------------------------------------------------------- cfg.json
@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    path = tmp_path_factory.mktemp("sae") / "topk"
    saelab.save(saelab.create(small_config("topk", d_in=12, d_sae=24)), path)
    return path


CFG_KEYS = [
    "architecture",
    "d_in",
    "d_sae",
    "k",
    "apply_b_dec_to_input",
    "normalize_activations",
    "rescale_acts_by_decoder_norm",
    "metadata",
]


@SETTINGS
@given(st.dictionaries(st.sampled_from(CFG_KEYS), values | st.just("DELETE"), min_size=1, max_size=3))
def test_any_edit_of_cfg_json_loads_or_names_the_problem(saved_sae, edits):
    cfg = json.loads((saved_sae / "cfg.json").read_text())
    for key, value in edits.items():
        if value == "DELETE":
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sae"
        shutil.copytree(saved_sae, folder)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        sae = accepted_or_one_line(saelab.load, folder)
    if sae is not None:
        assert sae.cfg.d_in == cfg["d_in"] and sae.cfg.d_sae == cfg["d_sae"]
        assert isinstance(sae.cfg.apply_b_dec_to_input, bool)


@SETTINGS
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_a_cfg_json_of_any_bytes_loads_or_names_the_problem(saved_sae, content):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sae"
        shutil.copytree(saved_sae, folder)
        (folder / "cfg.json").write_bytes(content)
        accepted_or_one_line(saelab.load, folder)


# ---------------------------------------------------------------------------- checkpoint state
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(saelab.create(small_config("relu", d_in=16, d_sae=48)), toy_source(), {**FAST, "steps": 20}, out).fit()
    return out


STATE_KEYS = [
    "step",
    "tokens",
    "input_scale",
    "sae_config",
    "train_config",
    "optimizer_param_groups",
    "rng",
    "world_size",
]


def _resume(folder):
    return Trainer(saelab.create(small_config("relu", d_in=16, d_sae=48)), toy_source(), {**FAST, "steps": 20}, folder)


@SETTINGS
@given(st.dictionaries(st.sampled_from(STATE_KEYS), values | st.just("DELETE"), min_size=1, max_size=2))
def test_any_edit_of_a_checkpoint_state_is_caught_and_loading_it_anyway_names_the_problem(run_folder, edits):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(run_folder, folder)
        path = ckpt.step_path(folder, 20)
        state = json.loads((path / "state.json").read_text())
        original = copy.deepcopy(state)
        for key, value in edits.items():
            if value == "DELETE":
                state.pop(key, None)
            else:
                state[key] = value
        (path / "state.json").write_text(json.dumps(state))
        reason = ckpt.verify(path)
        assert reason is not None or state == original
        trainer = _resume(folder)
        member = next(iter(trainer.members.values()))
        accepted_or_one_line(member._load, path, trainer.source)  # bypassing the checksum: still no traceback


@settings(SETTINGS, max_examples=15)
@given(st.sampled_from(["state.json", "tensors.safetensors"]), st.data())
def test_any_single_bit_flip_or_truncation_of_a_checkpoint_is_detected(run_folder, name, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(run_folder, folder)
        path = ckpt.step_path(folder, 20)
        original = (path / name).read_bytes()
        if data.draw(st.booleans(), "truncate"):
            cut = data.draw(st.integers(0, len(original) - 1), "keep bytes")
            damaged = original[:cut]
        else:
            at = data.draw(st.integers(0, len(original) - 1), "byte")
            bit = data.draw(st.integers(0, 7), "bit")
            damaged = bytearray(original)
            damaged[at] ^= 1 << bit
            damaged = bytes(damaged)
        (path / name).write_bytes(damaged)
        reason = ckpt.verify(path)
        if reason is None:  # only a flip that leaves the content equal (1e-08 -> 1E-08) may pass
            assert name == "state.json" and json.loads(damaged) == json.loads(original)
        result = _resume(folder).fit()  # damaged: set aside, trained again from the start
        assert result.steps == 20


def test_loading_a_state_with_tensors_of_another_sae_names_it(run_folder, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    trainer = Trainer(
        saelab.create(small_config("relu", d_in=16, d_sae=40)), toy_source(), {**FAST, "steps": 20}, folder
    )
    with pytest.raises(SaelabError, match="d_sae"):
        trainer.fit()
    assert torch.isfinite(next(iter(trainer.members.values())).sae.W_enc).all()


# ---------------------------------------------------------------------------- cache manifests
@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    """A one-shard activation cache, written as `saelab harvest` writes one."""
    from safetensors.torch import save_file

    from saelab.activations import cache

    folder = tmp_path_factory.mktemp("cache")
    shard = folder / "shard_00000.safetensors"
    save_file({"h": torch.randn(32, 4), "tokens": torch.arange(32, dtype=torch.int32)}, str(shard))
    manifest = {
        "format": cache.FORMAT,
        "model": "m",
        "hookpoints": {"h": 4},
        "dtype": "float32",
        "context_size": 8,
        "packing": True,
        "exclude_special": False,
        "data": None,
        "shards": [
            {"file": shard.name, "tokens": 32, "bytes": shard.stat().st_size, "sha256": cache.sha256_file(shard)}
        ],
        "total_tokens": 32,
        "complete": True,
        "rows_state": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    next(cache.CachedSource(folder, batch_size=4))  # the untouched manifest reads
    return folder, manifest


MANIFEST_KEYS = ["format", "model", "models", "hookpoints", "shards", "rows_state", "total_tokens", "complete"]
SHARD_KEYS = ["file", "bytes", "sha256", "tokens"]


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(MANIFEST_KEYS + [f"shard.{k}" for k in SHARD_KEYS]), values, min_size=1, max_size=2)
)
def test_any_edit_of_a_cache_manifest_reads_or_names_the_problem(cache_folder, edits):
    from saelab.activations.cache import CachedSource

    folder, manifest = cache_folder
    edited = copy.deepcopy(manifest)
    for key, value in edits.items():
        if key.startswith("shard."):  # an edit inside the first shard entry, while there is one
            shards = edited["shards"]
            if isinstance(shards, list) and shards and isinstance(shards[0], dict):
                shards[0][key[6:]] = value
        else:
            edited[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(folder / "shard_00000.safetensors", tmp)
        (Path(tmp) / "manifest.json").write_text(json.dumps(edited))
        try:
            next(CachedSource(tmp, batch_size=4))
        except SaelabError as exc:
            assert len(str(exc).splitlines()) == 1
