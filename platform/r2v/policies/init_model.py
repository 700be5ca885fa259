"""`init-model`: the quickstart SLM, built from config with no hub access.

A byte-level BPE tokenizer is trained with `tokenizers` on the environment's own text (goals,
observations, actions from the teacher rollouts), and a tiny Llama/Qwen2-architecture causal LM is
initialised from `model.init`. Both are saved as a real Hugging Face directory, so every later stage
loads it through exactly the code a 7B checkpoint would use.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig, TinyModelConfig
from r2v.errors import R2VError

INIT_MARKER = "r2v_init.json"  # written by init-model next to the model it built
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (any byte sequence encodes; no unknown characters) as a
    `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "left"  # batched scoring/generation appends after the prompt
    return fast


def build_model(arch: TinyModelConfig, tokenizer, max_positions: int):
    """A randomly initialised causal LM of the configured architecture."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    config = (LlamaConfig if arch.architecture == "llama" else Qwen2Config)(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def texts_from_rollouts(cfg: R2VConfig) -> list[str]:
    from r2v.data import ShardStore
    from r2v.experiment import Experiment
    from r2v.policies.prompts import completion, prompt_from_row

    store = ShardStore(Experiment(cfg).rollouts("teacher"), "steps")
    table = store.read(["goal", "history", "observation", "action", "admissible"])
    if table.num_rows == 0:
        raise R2VError(f"no teacher rollouts under {store.root}: run `r2v collect-teacher` first")
    texts = []
    for row in table.to_pylist():
        texts.append(prompt_from_row(row) + completion(row["action"] or ""))
        texts.extend(row["admissible"] or [])
    return texts


def check_writable(out_dir: str | Path, experiment: str | None) -> None:
    """A model directory is an input unless r2v's init-model built it (its INIT_MARKER) for this experiment:
    save_pretrained would silently overwrite someone's checkpoint."""
    out = Path(out_dir)
    weights = [p for p in ("config.json", "adapter_config.json") if (out / p).is_file()]
    weights += sorted(p.name for p in out.glob("*.safetensors")) + sorted(p.name for p in out.glob("*.bin"))
    if not weights:
        return
    try:
        marker = json.loads((out / INIT_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("experiment", experiment) == experiment:
        return  # ours (a marker without `experiment` predates the field)
    who = f"for experiment {experiment!r}" if isinstance(marker, dict) else f"(no readable {INIT_MARKER})"
    raise R2VError(
        f"{out} already holds a model ({', '.join(weights[:3])}) that r2v init-model did not build {who}; "
        f"init-model never overwrites a model directory. To train from it set model.path={out} "
        f"model.build_from_config=false; to build a fresh tiny model, move it away or use another `experiment`")


def save_tiny_model(texts: list[str], arch: TinyModelConfig, out_dir: str | Path, max_positions: int,
                    experiment: str | None = None) -> dict[str, Any]:
    """Tokenizer + model into `out_dir` (an HF directory) unless it holds a model it did not build
    (`check_writable`). Returns a small summary."""
    out = Path(out_dir)
    check_writable(out, experiment)
    tokenizer = train_tokenizer(texts, arch.vocab_size)
    model = build_model(arch, tokenizer, max_positions)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {"path": str(out), "params": n_params, "vocab": len(tokenizer), "architecture": arch.architecture,
               "experiment": experiment}
    (out / INIT_MARKER).write_text(json.dumps(summary, indent=2))
    return summary


def run_init_model(cfg: R2VConfig) -> dict[str, Any]:
    """build_from_config: a fresh tiny model into runs/<exp>/models/init (= `model.path`); otherwise check
    that `model.path` is a model directory, which is only ever read."""
    from r2v.config import check_model_path
    from r2v.experiment import Experiment

    if not cfg.model.build_from_config:
        if not (Path(cfg.model.path) / "config.json").is_file():
            raise R2VError(f"`model.path` = {cfg.model.path} is not a Hugging Face model directory (no config.json); "
                           "point it at a local checkpoint or set model.build_from_config=true")
        return {"path": cfg.model.path, "built": False}
    check_model_path(cfg)  # the config may have been changed after load_config validated it
    out = Experiment(cfg).model("init")
    check_writable(out, cfg.experiment)  # before the slow part (save_tiny_model checks again)
    max_positions = max(cfg.model.max_context_tokens, cfg.model.init.max_position_embeddings)
    return save_tiny_model(texts_from_rollouts(cfg), cfg.model.init, out, max_positions, experiment=cfg.experiment)
