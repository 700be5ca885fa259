"""A model of real shape (151,936-token Qwen2 vocabulary, ChatML template; built locally by the
`real_shape_dir` fixture): it loads through the project's loaders, prompts go through its chat template
with token-counted truncation, training examples put the loss on the action only, and shared-prefix rank
scoring equals full encoding."""
from __future__ import annotations

import pytest

from r2v.config import ModelConfig, PolicyConfig
from r2v.policies.prompts import (ACTION_TOKENS, SYSTEM_RULES, TRUNCATED, completion, encode_pair, encode_prompt, format_prompt,
                                  split_prompt)

pytestmark = pytest.mark.slow

GOAL = "Find the golden key, unlock the chest in the attic and take the treasure"


@pytest.fixture(scope="module")
def policy(real_shape_dir):
    from r2v.policies.slm import SLMPolicy

    return SLMPolicy(real_shape_dir, ModelConfig(max_context_tokens=256, device="auto"), PolicyConfig(mode="rank"))


def long_prompt(n_words: int = 1500) -> str:
    obs = " ".join(f"word{i}" for i in range(n_words)) + " THE-END-OF-THE-OBSERVATION"
    return format_prompt(GOAL, ["go north", "open door"], obs, obs_chars=0, goal_chars=0)


def test_loads_through_project_loaders(real_shape_dir, policy):
    from r2v.policies.real_shape import QWEN_VOCAB
    from r2v.train.common import load_model

    assert policy.model.config.vocab_size == QWEN_VOCAB == 151_936
    assert policy.tokenizer.chat_template and len(policy.tokenizer) > 150_000
    assert type(load_model(str(real_shape_dir), None, 0)).__name__ == "Qwen2ForCausalLM"


def test_chat_template_prompt_shape(policy):
    tok = policy.tokenizer
    prompt = format_prompt(GOAL, ["go north"], "You are in the attic. A chest is here.")
    assert split_prompt(prompt) == (GOAL, "Recent: go north\nObservation: You are in the attic. A chest is here.")
    text = tok.decode(encode_prompt(tok, prompt, 256))
    assert text.startswith("<|im_start|>system\n" + SYSTEM_RULES + "\n\nGoal: " + GOAL + "<|im_end|>\n")
    assert "<|im_start|>user\nRecent: go north\nObservation: You are in the attic." in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "Action:" not in text  # the plain template's marker is not in a chat prompt


def test_token_truncation_keeps_goal_rules_and_tail(policy):
    tok = policy.tokenizer
    ids = encode_prompt(tok, long_prompt(), 200)
    assert len(ids) <= 200
    text = tok.decode(ids)
    assert GOAL in text and SYSTEM_RULES in text  # goal and rules kept whole
    assert TRUNCATED.strip() in text and "word700" not in text  # the middle of the observation is gone
    assert "word0" in text or "Recent: go north" in text  # the head of the user message stays
    assert "THE-END-OF-THE-OBSERVATION" in text  # the newest output stays
    assert text.endswith("<|im_start|>assistant\n")


def test_training_example_is_prompt_plus_action_with_loss_on_action_only(policy):
    from r2v.train.common import encode, pad_batch

    tok = policy.tokenizer
    for prompt in (format_prompt(GOAL, [], "A chest is here."), long_prompt()):
        f = encode(tok, prompt, completion("open chest"), 256)
        assert len(f["input_ids"]) <= 256
        assert f["input_ids"][: f["n_prompt"]] == encode_prompt(tok, prompt, 256 - ACTION_TOKENS)
        batch = pad_batch([f], tok.pad_token_id)
        targets = batch["input_ids"][0, 1:][batch["loss_mask"][0]].tolist()
        assert tok.decode(targets) == "open chest<|im_end|>"  # the assistant turn and its end, nothing else


def test_plain_tokenizer_encoding_is_unchanged(tmp_path):
    """Without a chat template (the quickstart's tiny model) the text is encoded as before: prompt cut
    from the left, completion with a leading space, then eos."""
    from r2v.config import TinyModelConfig
    from r2v.policies.init_model import save_tiny_model
    from transformers import AutoTokenizer

    texts = [f"Goal: take the key\nObservation: room {i}\nAction: go north" for i in range(50)]
    save_tiny_model(texts, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                           vocab_size=300), tmp_path, 64)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert not tok.chat_template
    prompt = format_prompt("take the key", [], "room 7 " * 30)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(" go north", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert encode_pair(tok, prompt, " go north", 40) == (p[-(40 - len(c)):] + c, 40 - len(c))
    assert encode_prompt(tok, prompt, 30) == p[-30:]


def test_shared_prefix_scores_equal_full_encoding_at_real_vocabulary(policy, monkeypatch):
    prompt = long_prompt(300)  # truncated to the context: every action shares the same cut prompt
    comps = [completion(a) for a in ("go north", "take golden key", "unlock chest with golden key", "look", "z")]
    full = policy.score([prompt] * len(comps), comps)
    monkeypatch.setattr(policy, "score", None)  # the shared path must not fall back to full encoding
    shared = policy.score_actions(prompt, comps)
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(shared) == pytest.approx(flat(full), rel=1e-4, abs=1e-4)


def test_rank_mode_acts_with_the_real_shape_model(policy, tw_cfg, tw_tasks):
    from r2v.envs.registry import make_env
    from r2v.policies.base import StepContext

    env = make_env(tw_cfg)
    ctx = StepContext(tw_tasks[0], env.reset(tw_tasks[0], seed=0), [], 0, 30)
    d = policy.act([ctx])[0]
    assert d.action in ctx.observation.admissible and d.candidates
