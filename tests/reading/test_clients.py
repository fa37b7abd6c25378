"""The OpenAI-compatible client against a loopback server on 127.0.0.1 (stdlib http.server), driven
by the real `openai` package: the oracle policy behind HTTP gives the same scores as in process,
and retries, timeouts, permanent failures and refused keys behave as documented. No network."""

import pytest

pytest.importorskip("openai")

from saelab.reading.autointerp import AutointerpConfig, run_autointerp  # noqa: E402
from saelab.reading.clients import ClientError, OpenAIClient, Request  # noqa: E402
from tests.reading import oracle  # noqa: E402
from tests.reading.loopback import Server  # noqa: E402


@pytest.fixture(scope="module")
def world():
    return oracle.make_world()


def _score(world, client, latents=(0, 1, 2, 3)):
    collection, acts = world
    return run_autointerp(
        collection,
        client,
        oracle.Vocab(),
        latents=list(latents),
        window_activations=acts,
        neighbours={j: [(j + 1) % oracle.N_LATENTS] for j in range(oracle.N_LATENTS)},
        config=AutointerpConfig(n_explain=8, n_test=10, n_random=5, n_hard=5, score_max_tokens=24),
        progress=False,
    )


def _strip(res):
    return [{k: {m: v for m, v in s.items() if m != "replies"} for k, s in r["scores"].items()} for r in res["latents"]]


def test_loopback_server_gives_the_in_process_scores_with_bounded_concurrency(world):
    with Server() as srv:
        client = OpenAIClient("oracle", base_url=srv.url, timeout=5, max_retries=1, concurrency=3)
        res = _score(world, client)
    local = _score(world, oracle.ScriptedClient())
    assert _strip(res) == _strip(local)
    assert all(r["scores"]["detection"]["auroc"] == 1.0 for r in res["latents"])  # logprobs made it through HTTP
    assert res["client"]["base_url"] == srv.url and res["client"]["concurrency"] == 3
    assert 1 < srv.max_in_flight <= 3
    scoring = [b for b in srv.requests if b.get("logprobs")]
    assert scoring and all(
        b["max_tokens"] == 24 and b["temperature"] == 0.0 and b["top_logprobs"] == 5 for b in scoring
    )


def test_server_errors_and_timeouts_are_retried():
    with Server() as srv:
        client = OpenAIClient("oracle", base_url=srv.url, timeout=0.5, max_retries=2, concurrency=1)
        msgs = [
            {"role": "system", "content": "detection"},
            {"role": "user", "content": "Explanation: w1\n\nExcerpt 1: w1 w2"},
        ]
        srv.fail_next = 2
        rep = client.complete(Request(msgs, logprobs=True))
        assert rep.error is None and rep.text == "[1]" and len(srv.requests) == 3
        srv.sleep_next, srv.sleep_s = 1, 1.5
        rep = client.complete(Request(msgs, logprobs=True))
        assert rep.error is None and rep.text == "[1]" and len(srv.requests) == 5  # timed out once, then answered


def test_a_request_that_keeps_failing_counts_as_an_unparseable_reply(world):
    with Server() as srv:
        srv.fail_next = 10**9
        client = OpenAIClient("oracle", base_url=srv.url, timeout=2, max_retries=0, concurrency=2)
        res = _score(world, client, latents=(0, 1))
    for r in res["latents"]:
        assert r["explainer_reply"].startswith("(error:")
        for s in r["scores"].values():
            assert s["failure_rate"] == 1.0 and s["strict_balanced_accuracy"] == 0.0 and s["balanced_accuracy"] is None


def test_a_refused_key_stops_the_run_with_a_clear_error():
    with Server() as srv:
        srv.status = 401
        client = OpenAIClient("oracle", base_url=srv.url, timeout=2, max_retries=0)
        with pytest.raises(ClientError, match="refused model 'oracle'"):
            client.complete(Request([{"role": "user", "content": "hi"}]))


def test_local_transformers_client_greedy_prefill_and_logprobs(tmp_path):
    from saelab.reading.clients import TransformersClient
    from tests.models import tiny

    tok = tiny.make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tiny.trained_gpt2().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    client = TransformersClient(str(tmp_path), top_logprobs=3)
    req = Request([{"role": "user", "content": "the red cat sat on"}], max_tokens=4, logprobs=True, prefill="the")
    a, b = client.complete(req), client.complete(req)
    assert a.text == b.text and a.text.startswith("the") and a.error is None  # greedy: the same twice
    assert len(a.logprobs) == 4 and all(len(alts) >= 3 for alts in a.logprobs)
    for alts in a.logprobs:  # log-probabilities of a distribution, best first
        lps = [lp for _, lp in alts[:3]]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    long = Request([{"role": "user", "content": "cat " * 70}], max_tokens=4)
    assert client.complete(long).error.startswith("prompt of")  # bounded by the model's context
