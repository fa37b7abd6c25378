"""The OpenAI-compatible client against a loopback server on 127.0.0.1 (stdlib http.server), driven
by the real `openai` package: the oracle policy behind HTTP gives the same scores as in process,
and retries, timeouts, permanent failures and refused keys behave as documented. No network."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from saelab.reading.autointerp import AutointerpConfig, run_autointerp  # noqa: E402
from saelab.reading.clients import ClientError, OpenAIClient, Request  # noqa: E402
from tests.reading import oracle  # noqa: E402


class Server:
    """`/v1/chat/completions` answering with the oracle policy; faults on request."""

    def __init__(self, scorer=None):
        self.scorer = scorer
        self.fail_next = 0  # answer this many requests with HTTP 500
        self.sleep_next = 0  # answer this many requests after `sleep_s`
        self.sleep_s = 0.0
        self.status = 200  # a permanent status for every request (e.g. 401)
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    fail = outer.fail_next > 0
                    outer.fail_next -= fail
                    sleep = outer.sleep_next > 0
                    outer.sleep_next -= sleep
                try:
                    if sleep:
                        time.sleep(outer.sleep_s)
                    if outer.status != 200 or fail:
                        code = outer.status if outer.status != 200 else 500
                        self._send(code, {"error": {"message": "scripted failure", "type": "server_error"}})
                        return
                    self._send(200, outer.completion(body))
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "5")  # keep the client's back-off short in tests
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def completion(self, body: dict) -> dict:
        req = Request(
            body["messages"], body.get("max_tokens", 16), body.get("temperature", 0.0), bool(body.get("logprobs"))
        )
        reply = oracle.respond(req, self.scorer)
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"}
        if body.get("logprobs") and reply.logprobs:
            content = []
            for alts in reply.logprobs:
                tok, lp = max(alts, key=lambda a: a[1])
                top = [{"token": t, "logprob": v, "bytes": None} for t, v in alts[: body.get("top_logprobs", 5)]]
                content.append({"token": tok, "logprob": lp, "bytes": None, "top_logprobs": top})
            choice["logprobs"] = {"content": content}
        else:
            choice["logprobs"] = None
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


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
