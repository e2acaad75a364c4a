"""Tiny randomly initialised causal LMs of several families, with a word-level tokenizer: fast mechanics tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from hoppatch.engine.models import LoadedModel, wrap_model

WORDS = (
    "the of is a an in was by capital country city nationality creator author currency person who founded religion "
    "that citizen name current head state language official continent born located created France Paris Germany "
    "Berlin Poe Edgar Allan United States America Dupin Auguste C. Japan yen Islam Muhammad Poland Warsaw India Delhi "
    "New York Q: A: ? . , and to on"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def _configs(vocab: int) -> dict[str, object]:
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    return {
        "llama": LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128),
        "mistral": MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None),
        "qwen2": Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128),
        "gemma3_text": Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=64),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=128),
        "gpt_neox": GPTNeoXConfig(**common, max_position_embeddings=128),
    }


FAMILIES = tuple(_configs(8))


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    config = _configs(len(tokenizer))[family]
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(f"tiny:{family}", model, tokenizer)
