"""A randomly initialised model of *real* shape, built locally (never from a hub): Qwen2 architecture,
Qwen's 151,936-token vocabulary, a byte-level BPE tokenizer of ~151.6k tokens with ChatML special tokens
and a chat template. Tests and benches use the small preset to exercise what a 0.5B–8B instruct checkpoint
exercises (a vocabulary that makes naive log-softmax explode, chat templates, KV caches); the `0.5b`
preset has Qwen2.5-0.5B's layer shapes for GPU smoke runs. CLI: `scripts/make_real_shape_model.py`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

QWEN_VOCAB = 151_936  # Qwen2's embedding rows (the tokenizer has fewer: the rest are padding rows)
TOKENIZER_SIZE = 151_665
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML as Qwen2 instruct models use it (without the tool-calling branches)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PRESETS: dict[str, dict[str, int]] = {
    # ~9.8M parameters, nearly all in the (tied) embedding: fast on CPU, real vocabulary
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # ~51M parameters (39M in the tied embedding), 12 layers: the body's cost per token (~12M MACs) is a
    # real share of the output head's (39M); in Qwen2.5-0.5B it is 357M vs 136M (benches)
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2),
    # Qwen2.5-0.5B's shapes (~494M parameters)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
}
_WORDS = ("you are in a room kitchen cellar attic garden hall the an north south east west up down go take "
          "drop open close door chest key coin lamp table shelf treasure find look inventory examine put "
          "on into from with is there here exit leads to of and this that unlock insert read eat cook cut "
          "slice fry grill recipe error exit code file python def return print import ls cd cat echo grep "
          "test pass fail score moves goal action observation recent valid actions write run").split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ":", ""]))
    return lines


def build_tokenizer(size: int = TOKENIZER_SIZE):
    """A byte-level BPE fast tokenizer with exactly `size` tokens: trained on a small synthetic corpus,
    then padded with merges of existing tokens (rare in text, but real entries of the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = byte_level
    base.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    target = size - len(SPECIAL)
    pieces = sorted(vocab, key=vocab.get)
    i = j = 0
    while len(vocab) < target:  # deterministic: pairs of the trained tokens in id order
        a, b = pieces[i], pieces[j]
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
        j += 1
        if j == len(pieces):
            i, j = i + 1, 0
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768)


def make_real_shape_model(out_dir: str | Path, preset: str = "tiny", *, vocab_size: int = QWEN_VOCAB,
                          max_positions: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Write tokenizer + randomly initialised Qwen2 weights to `out_dir` (an HF directory). Returns a summary."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(min(TOKENIZER_SIZE, vocab_size))
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, **PRESETS[preset])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"path": str(out), "preset": preset, "vocab_size": vocab_size, "tokenizer_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters())}


__all__ = ["make_real_shape_model", "build_tokenizer", "PRESETS", "QWEN_VOCAB", "CHAT_TEMPLATE"]
