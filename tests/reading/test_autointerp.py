"""Autointerp with a stubbed LLM: oracle explainer and scorer built from a toy world's ground truth."""

import math
import random
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from saelab.errors import ConfigError
from saelab.reading.autointerp import (
    AutointerpConfig,
    binary_scores,
    decoder_neighbours,
    highlight,
    label_probabilities,
    parse_explanation,
    parse_labels,
    run_autointerp,
    split_activating,
)
from saelab.reading.clients import Reply
from tests.reading import oracle


@pytest.fixture(scope="module")
def world():
    return oracle.make_world()


def _run(world, client, **cfg):
    collection, acts = world
    neighbours = {j: [(j + 1) % oracle.N_LATENTS] for j in range(oracle.N_LATENTS)}
    cfg.setdefault("n_explain", 12)
    cfg.setdefault("n_test", 20)
    return run_autointerp(
        collection,
        client,
        oracle.Vocab(),
        window_activations=acts,
        neighbours=neighbours,
        config=AutointerpConfig(**cfg),
        progress=False,
    )


# ----------------------------------------------------------------------------- pure functions
def test_highlight_wraps_runs_and_keeps_spaces_outside():
    toks = [" the", " big", " cat", " sat", "\n"]
    assert highlight(toks, [False, True, True, False, False]) == " the <<big cat>> sat\\n"
    assert highlight(toks, [True] + [False] * 4) == " <<the>> big cat sat\\n"


def test_parse_explanation_and_labels():
    assert parse_explanation("blah\n[EXPLANATION]: the word 'def'\n") == "the word 'def'"
    assert parse_explanation("Explanation: numbers") == "numbers"
    assert parse_explanation("no marker here") is None
    assert parse_labels("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("[1, 0] then [0,0,1]", 3) == [0, 0, 1]
    assert parse_labels("[1, 0, 2]", 3) is None
    assert parse_labels("[1, 0]", 3) is None
    assert parse_labels("yes yes no", 3) is None


@given(st.text(max_size=60), st.integers(1, 6))
def test_parse_labels_never_returns_a_wrong_length(text, n):
    out = parse_labels(text, n)
    assert out is None or (len(out) == n and set(out) <= {0, 1})


def test_label_probabilities_read_p1_and_refuse_misaligned_replies():
    rep = oracle.list_reply([1, 0, 1], confidence=0.8)
    assert label_probabilities(rep, 3) == pytest.approx([0.8, 0.2, 0.8])
    assert label_probabilities(rep, 4) is None
    assert label_probabilities(Reply("[1, 0, 1]"), 3) is None


def test_binary_scores_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = random.Random(0)
    truth = [rng.randrange(2) for _ in range(200)]
    pred = [t if rng.random() < 0.7 else 1 - t for t in truth]
    prob = [min(1.0, max(0.0, 0.5 + (0.3 if p else -0.3) + rng.gauss(0, 0.2))) for p in pred]
    s = binary_scores(truth, pred, prob)
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert s["auroc"] == pytest.approx(roc_auc_score(truth, prob))
    assert s["strict_balanced_accuracy"] == s["balanced_accuracy"] and s["failure_rate"] == 0


def test_strict_score_counts_failures_as_wrong():
    truth = [1, 1, 0, 0]
    s = binary_scores(truth, [1, None, 0, None], [None] * 4)
    assert s["balanced_accuracy"] == 1.0
    assert s["strict_balanced_accuracy"] == 0.5
    assert s["failure_rate"] == 0.5 and s["auroc"] is None


def test_split_is_disjoint_and_spans_the_quantiles(world):
    collection, _ = world
    lc = collection.latents[0]
    explain, test = split_activating(lc, 10, 10, random.Random(0))
    assert len(explain) == 10 and len(test) == 10
    assert not {tuple(c.token_ids) for c in explain} & {tuple(c.token_ids) for c in test}
    bin_of = {tuple(c.token_ids): b for b, q in enumerate(lc.quantiles) for c in q}
    assert len({bin_of[tuple(c.token_ids)] for c in explain}) == len(lc.quantiles)
    assert len({bin_of[tuple(c.token_ids)] for c in test}) == len(lc.quantiles)


def test_decoder_neighbours_rank_by_cosine():
    class Sae:
        W_dec = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])

    assert decoder_neighbours(Sae(), [0], 3)[0] == [1, 2, 3]


def test_config_rejects_bad_settings():
    with pytest.raises(ConfigError, match="unknown scorer"):
        AutointerpConfig(scorers=("simulation",))
    with pytest.raises(ConfigError, match="non-activating"):
        AutointerpConfig(n_random=0, n_hard=0)


# ----------------------------------------------------------------------------- end to end, stubbed LLM
def test_oracle_explanations_score_near_one_and_borrowed_ones_near_half(world):
    client = oracle.ScriptedClient()
    res = _run(world, client, n_hard=0, n_random=20)
    for r in res["latents"]:
        named = {int(w) for w in re.findall(r"\bw(\d+)", r["explanation"])}
        assert named == oracle.token_set(r["latent"])  # highlighting showed exactly S_j
        for kind in ("detection", "fuzzing"):
            s = r["scores"][kind]
            assert s["n"] == 40 and s["n_positive"] == 20 and s["failure_rate"] == 0
            assert s["balanced_accuracy"] == 1.0 and s["auroc"] == 1.0
    # another latent's explanation: chance level (mean over latents and both scorers)
    base = [r["baseline"]["scores"][k]["balanced_accuracy"] for r in res["latents"] for k in ("detection", "fuzzing")]
    assert all(r["baseline"]["explanation_from"] != r["latent"] for r in res["latents"])
    assert abs(sum(base) / len(base) - 0.5) < 0.08
    assert res["summary"]["detection"]["balanced_accuracy"] == 1.0
    assert client.calls["explain"] == oracle.N_LATENTS
    assert client.calls["detection"] == 2 * oracle.N_LATENTS * 40 // 5  # explanation + baseline, 5 per prompt


def test_hard_negatives_are_silent_neighbour_contexts(world):
    collection, acts = world
    res = _run(world, oracle.ScriptedClient(), n_hard=10, n_random=10, baseline=False)
    for r in res["latents"]:
        j = r["latent"]
        top = collection.latents[(j + 1) % oracle.N_LATENTS].top
        silent = {tuple(c.token_ids) for c in top if not oracle.token_set(j) & set(c.token_ids)}
        assert r["n_negatives"] == {"random": 10, "hard": min(10, len(silent))}
        # a neighbour's top contexts are full of its own tokens: the true explanation still rejects them
        assert r["scores"]["detection"]["true_negative_rate"] == 1.0
    # the silence check is the exact ground truth: feed it a window holding a token of S_0
    assert acts([[0, 50, 51]], [0, 1]).tolist() == [[1.0, 0.0]]


def test_hard_negatives_use_only_windows_where_the_latent_is_silent(world):
    collection, _ = world
    seen = []

    def spy(windows, latents):
        seen.append(len(windows))
        out = oracle.window_activations(windows, latents)
        return torch.zeros_like(out) + 1.0  # claim every latent fires everywhere: nothing is usable

    res = run_autointerp(
        collection,
        oracle.ScriptedClient(),
        oracle.Vocab(),
        latents=[0, 1],
        window_activations=spy,
        neighbours={0: [1], 1: [0]},
        config=AutointerpConfig(n_explain=4, n_test=4, baseline=False),
        progress=False,
    )
    assert seen and all(r["n_negatives"] == {"random": 0, "hard": 0} for r in res["latents"])


def test_always_yes_scorer_scores_exactly_half(world):
    res = _run(world, oracle.ScriptedClient(scorer=oracle.always_yes), n_hard=10, n_random=10)
    for r in res["latents"]:
        for kind in ("detection", "fuzzing"):
            s = r["scores"][kind]
            assert s["balanced_accuracy"] == 0.5 and s["strict_balanced_accuracy"] == 0.5
            assert s["auroc"] == 0.5


def test_malformed_replies_count_as_failures(world):
    state = {"n": 0}

    def flaky(request):
        state["n"] += 1
        if state["n"] % 4 == 0:
            return "I think most of them are yes."
        if state["n"] % 4 == 1:
            return oracle.list_reply(oracle.oracle_labels(request)[:-1])  # one label short
        return oracle.list_reply(oracle.oracle_labels(request))

    res = _run(world, oracle.ScriptedClient(scorer=flaky), baseline=False)
    fails = [r["scores"][k]["failure_rate"] for r in res["latents"] for k in ("detection", "fuzzing")]
    assert sum(fails) / len(fails) == pytest.approx(0.5, abs=0.05)
    for r in res["latents"]:
        for kind in ("detection", "fuzzing"):
            s = r["scores"][kind]
            if s["failures"]:
                assert s["strict_balanced_accuracy"] < s["balanced_accuracy"] == 1.0
            assert s["strict_balanced_accuracy"] == pytest.approx(1 - s["failure_rate"])  # every failure is wrong


def test_unparsed_explanation_is_flagged_and_still_scored(world):
    client = oracle.ScriptedClient(explainer=lambda req: "I am not sure what these have in common.")
    res = _run(world, client, baseline=False)
    assert all(not r["explanation_parsed"] for r in res["latents"])
    assert res["summary"]["explanations_parsed"] == 0.0
    assert all(not math.isnan(r["scores"]["detection"]["strict_balanced_accuracy"]) for r in res["latents"])


def test_results_record_what_shaped_the_scores(world):
    res = _run(world, oracle.ScriptedClient(), baseline=False, seed=3)
    assert res["client"] == {"client": "scripted", "model": "oracle"}
    assert res["config"]["seed"] == 3 and res["config"]["score_temperature"] == 0.0
    assert "[EXPLANATION]" in res["prompts"]["explain_system"]
    again = _run(world, oracle.ScriptedClient(), baseline=False, seed=3)
    assert [r["scores"] for r in again["latents"]] == [r["scores"] for r in res["latents"]]


def test_missing_latent_is_a_clear_error(world):
    collection, acts = world
    with pytest.raises(ConfigError, match="no contexts"):
        run_autointerp(
            collection, oracle.ScriptedClient(), oracle.Vocab(), latents=[99], window_activations=acts, progress=False
        )
