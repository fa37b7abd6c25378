"""A loopback OpenAI-compatible server (stdlib http.server on 127.0.0.1) answering with the oracle policy."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from saelab.reading.clients import Request
from tests.reading import oracle


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
