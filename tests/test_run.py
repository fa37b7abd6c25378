"""The run pipeline: a typed run config, held-out data by one rule, sources with several sites."""

import pytest
import torch
import yaml
from safetensors.torch import save_file

import saelab
from saelab.activations.base import Batch, IteratorSource
from saelab.activations.factory import HELD_OUT_SEED_OFFSET, build_source, held_out, parse_source
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.run import RunConfig

WORLD = {"n_features": 32, "d": 12, "firing_prob": 0.08}
SAE = {"architecture": "topk", "d_in": 12, "d_sae": 24, "k": 3}
TRAIN = {"steps": 20, "progress": False, "norm_estimation_batches": 2, "log_every": 10}


def config(**change):
    cfg = {"sae": dict(SAE), "train": dict(TRAIN), "source": {"type": "world", "world": WORLD, "batch_size": 32}}
    for section, values in change.items():
        cfg[section] = values if not isinstance(values, dict) else {**cfg.get(section, {}), **values}
    return cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": {"batch_size": "abc"}}, r"source \(world\): 'batch_size': Input should be a valid integer"),
        ({"source": {"batch_size": [1, 2]}}, r"'batch_size': Input should be a valid integer"),
        ({"source": {"batch_size": 1.9}}, r"'batch_size': Input should be a valid integer \(got 1.9\)"),
        ({"source": {"seed": "x"}}, r"'seed': Input should be a valid integer"),
        ({"source": [{"type": "world"}]}, r"`source` must be a mapping with a `type`"),
        ({"source": {"world": [1]}}, r"'world': Input should be a valid dictionary"),
        (
            {"source": {"type": "wrold"}},
            r"unknown source type 'wrold'; valid types: cache, crosscoder_world, diff_world, model",
        ),
        ({"source": {"batch_sise": 3}}, r"unknown key 'batch_sise'"),
        ({"train": {"steps": True}}, r"train: 'steps': Input should be a valid integer \(got True\)"),
        ({"train": [1]}, r"`train` must be a mapping"),
        ({"sae": {"d_in": "12"}}, r"'d_in': Input should be a valid integer \(got '12'\)"),
        ({"eval": {"batches": 0}}, r"eval: 'batches': Input should be greater than 0"),
    ],
)
def test_bad_values_anywhere_in_a_run_config_give_one_line_naming_the_field(change, message, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(**change)))
    assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saelab train: error:")
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("path_kind", ["folder", "binary"])
def test_a_config_path_that_is_not_a_text_file_is_named(path_kind, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.mkdir() if path_kind == "folder" else path.write_bytes(b"\xff\xfe\x00binary")
    assert main(["train", str(path)]) == 2
    assert ("is a folder" if path_kind == "folder" else "not a text file") in capsys.readouterr().err


def test_the_python_api_runs_what_the_cli_runs(tmp_path):
    records = saelab.run(config(), out=tmp_path / "api")
    assert main(["train", _write(tmp_path, config()), "--out", str(tmp_path / "cli")]) == 0
    cli = yaml.safe_load((tmp_path / "cli" / "results.json").read_text())
    assert len(records) == 1
    for key in ("l0", "fvu", "recovered_fraction", "train_steps"):
        assert records[0][key] == cli[0][key], key
    sae = saelab.load(records[0]["path"])  # saved ready to use: raw activations in
    x = next(build_source(config()["source"])).x
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 1.0


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_held_out_data_is_the_source_reseeded_unless_an_eval_source_is_given():
    source = parse_source({"type": "world", "world": WORLD, "seed": 3})
    assert held_out(source).seed == 3 + HELD_OUT_SEED_OFFSET and held_out(source).world == WORLD
    other = {"type": "world", "world": {**WORLD, "seed": 9}}
    assert held_out(source, other).world["seed"] == 9
    train_x, eval_x = next(source.build()).x, next(held_out(source).build()).x
    assert not torch.equal(train_x, eval_x)


def test_run_config_defaults_live_in_one_place():
    cfg = RunConfig.parse({"sae": SAE})
    assert cfg.source.type == "world" and cfg.source.batch_size == 1024 and cfg.eval.batches == 8
    assert cfg.train.steps == saelab.TrainConfig().steps


def test_a_tensor_file_source_batches_shuffles_and_resumes_exactly(tmp_path):
    data = torch.randn(100, 6)
    save_file({"acts": data}, str(tmp_path / "acts.safetensors"))
    spec = {"type": "tensors", "path": str(tmp_path / "acts.safetensors"), "batch_size": 16, "seed": 1}
    src = build_source(spec)
    first = [next(src).x for _ in range(6)]  # 6 batches of 16 = 96 rows: one pass without repeats
    rows = torch.cat(first)
    assert len({tuple(r.tolist()) for r in rows}) == 96 and not torch.equal(rows, data[:96])
    state = src.state_dict()
    ahead = [next(src).x for _ in range(3)]  # crosses into the second (reshuffled) pass
    src.load_state_dict(state)
    assert all(torch.equal(a, next(src).x) for a in ahead)
    with pytest.raises(ConfigError, match="no tensor 'x'"):
        build_source({**spec, "key": "x"})


class TwoSites(IteratorSource):
    """A source with two named sites per batch: `a` (the world's x) and `b` = 2 a + 1."""

    def __init__(self):
        def batches():  # a new stream on each call, so the trainer's rewind replays the same batches
            world_source = build_source({"type": "world", "world": WORLD, "batch_size": 32})
            while True:
                a = next(world_source).x
                yield Batch(x=a, sites={"a": a, "b": 2 * a + 1})

        super().__init__(batches)


def test_an_sae_trains_on_one_site_of_a_two_site_source():
    on_b = saelab.train({**SAE, "site": "b"}, TwoSites(), TRAIN)
    on_b_direct = saelab.train(
        SAE, lambda: (2 * b.x + 1 for b in build_source({"type": "world", "world": WORLD, "batch_size": 32})), TRAIN
    )
    for (name, p), q in zip(on_b.sae.state_dict().items(), on_b_direct.sae.state_dict().values()):
        torch.testing.assert_close(p, q, msg=f"{name}: training on site b differs from training on b itself")
    with pytest.raises(ConfigError, match="no site 'c'; its sites: a, b"):
        saelab.train({**SAE, "site": "c"}, TwoSites(), TRAIN)


def test_batch_views_keep_an_sae_target_the_same_tensor():
    x = torch.randn(4, 3)
    batch = Batch(x=x, sites={"in": x, "out": x + 1})
    assert batch.target is batch.x
    sae_view = batch.view("out")
    assert sae_view.x is batch.sites["out"] and sae_view.target is sae_view.x
    transcoder_view = batch.view("in", "out")
    assert transcoder_view.x is x and torch.equal(transcoder_view.target, x + 1)
    half = transcoder_view.rows(slice(0, 2))
    assert half.x.shape == (2, 3) and torch.equal(half.target, (x + 1)[:2]) and half.sites["in"].shape == (2, 3)
    assert Batch(x=x).rows(slice(0, 2)).target is not None
    same = Batch(x=x).rows(slice(0, 2))
    assert same.target is same.x
