"""Tiny models, a word-level tokenizer and structured text, all built offline (no download).

Builders are cached per process so tests in several folders share one copy.
"""

import functools
import random

import torch

NOUNS = "cat dog bird fox cow owl".split()
ADJS = "red blue green big small happy".split()
VERBS = "sat ran flew saw chased found".split()
PREPS = "on under over near".split()
PLACES = "mat log tree house park river".split()
WORDS = sorted(set(NOUNS + ADJS + VERBS + PREPS + PLACES + ["the", "a", "and", "then"]))
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def make_texts(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Sentences from a small grammar, so a trained model has something to predict."""
    rng = random.Random(seed)

    def sentence() -> str:
        return (
            f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(PREPS)} the {rng.choice(PLACES)}"
        )

    return [" and then ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(n_docs)]


@functools.lru_cache(None)
def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _ids(tok):
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=64, **_ids(tok))
    ).eval()


def make_llama(seed: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=64,
            **_ids(tok),
        )
    ).eval()


@functools.lru_cache(None)
def trained_gpt2(steps: int = 80):
    """A tiny GPT-2 trained briefly on the grammar, so ablating a layer hurts its loss."""
    from saelab.models.text import TokenRows, load_texts

    tok = make_tokenizer()
    model = make_gpt2(seed=3).train()
    rows = TokenRows(load_texts(make_texts(200, seed=5)), tok, context_size=24)
    data = []
    while (b := rows.next_rows(16)) is not None:
        data.append(b)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _step in range(steps):
        ids, mask = data[int(torch.randint(len(data), (1,), generator=gen))]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
