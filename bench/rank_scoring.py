"""Rank-mode scoring: shared-prefix (prompt encoded once, actions continue from its KV cache) vs full encoding
of every (prompt, action), on a model of real shape, plus the memory of chosen-token log-probs.

    python -m bench.rank_scoring [--prompt-tokens 256 --actions 8 --repeats 7 --preset small]

The model is a random Qwen2 with Qwen's 151,936-token vocabulary and a ChatML chat template, built locally
(r2v.policies.real_shape; no download). The `small` preset (hidden 256, 12 layers, ~51M parameters of which
39M are the tied embedding) costs ~12M MACs per token in its layers and 39M in the output head. Shared-prefix
scoring saves layer compute only (every chosen token still needs its full-vocabulary log-softmax), so the
speed-up grows with the layers' share: Qwen2.5-0.5B spends 357M MACs per token in its layers and 136M in the
head, and gains more than this bench shows. The prompt is a chat-template prompt of `--prompt-tokens` tokens,
the actions are TextWorld-like commands of 2–6 words. Both paths return the same scores (checked here, and
in tests/test_real_shape.py); the table shows the median wall time per step and the speed-up. The memory
row compares the peak of a naive fp32 log-softmax with the chunked one (r2v.policies.logprobs) over the
full encoding's logits. Writes runs/bench/rank_scoring.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ACTIONS = ["go north", "take golden key", "open wooden chest", "unlock chest with golden key", "look",
           "examine rusty lamp", "drop apple", "go west", "put coin on table", "inventory", "eat apple", "go up"]


def prompt_of(tokenizer, n_tokens: int) -> str:
    """A rendered step prompt whose chat-template encoding has about `n_tokens` tokens."""
    from r2v.policies.prompts import encode_prompt, format_prompt

    words = ["You are in the attic. A chest is here and a door leads north."]
    while True:
        prompt = format_prompt("find the golden key and open the chest", ["go north", "open door"],
                               " ".join(words), obs_chars=0, goal_chars=0)
        if len(encode_prompt(tokenizer, prompt, 10**9)) >= n_tokens:
            return prompt
        words.append(f"There is a lamp number {len(words)} here.")


def timed(fns: list, repeats: int) -> list[tuple[float, float, object]]:
    """Median wall time, median process CPU time and last result of each function, run interleaved
    (A B A B ...) so that a change in machine load hits every method alike. CPU time is the robust one on a
    shared machine: other processes' load inflates wall time, not this process's CPU seconds."""
    outs, wall, cpu = [None] * len(fns), [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[i] = fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c), o) for w, c, o in zip(wall, cpu, outs)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--actions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--preset", default="small", help="r2v.policies.real_shape preset (tiny | small | 0.5b)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 keeps the ratio steady on a small shared machine")
    ap.add_argument("--out", default="runs/bench/rank_scoring.json")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from r2v.config import ModelConfig, PolicyConfig, resolve_device
    from r2v.policies.prompts import completion, encode_pair
    from r2v.policies.real_shape import make_real_shape_model
    from r2v.policies.slm import SLMPolicy

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="r2v-bench-rank-") as tmp:
        info = make_real_shape_model(Path(tmp) / "model", args.preset)
        policy = SLMPolicy(info["path"], ModelConfig(max_context_tokens=4096, device="auto"), PolicyConfig())
        prompt = prompt_of(policy.tokenizer, args.prompt_tokens)
        comps = [completion(a) for a in (ACTIONS * 4)[: args.actions]]
        n_prompt = encode_pair(policy.tokenizer, prompt, comps[0], 4096)[1]
        policy.score_actions(prompt, comps)  # warm-up (allocator, kernels)
        policy.score([prompt] * len(comps), comps)
        (t_full, c_full, full), (t_shared, c_shared, shared) = timed(
            [lambda: policy.score([prompt] * len(comps), comps), lambda: policy.score_actions(prompt, comps)],
            args.repeats)
        max_diff = max(abs(a - b) for x, y in zip(full, shared) for a, b in zip(x, y))

        # memory of chosen-token log-probs over the full encoding's logits (one forward, no grad)
        seqs = [encode_pair(policy.tokenizer, prompt, c, 4096)[0] for c in comps]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [policy.tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logits = policy.model(input_ids=ids.to(policy.device)).logits
        naive_bytes = logits.numel() * 4 * 2  # fp32 copy + fp32 log-softmax
        chunk_bytes = _chunk_peak_bytes(logits)
    result = {
        "model": {"preset": args.preset, "params": info["parameters"], "vocab_size": info["vocab_size"],
                  "arch": "qwen2"},
        "device": resolve_device("auto"), "threads": torch.get_num_threads(),
        "prompt_tokens": n_prompt, "actions": len(comps), "repeats": args.repeats, "statistic": "median",
        "full_s": t_full, "shared_s": t_shared, "speedup": t_full / t_shared, "max_abs_diff": max_diff,
        "full_cpu_s": c_full, "shared_cpu_s": c_shared, "speedup_cpu": c_full / c_shared,
        "logits_shape": list(logits.shape), "naive_logprob_bytes": naive_bytes, "chunked_logprob_bytes": chunk_bytes,
        "load_before": load_before,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nRank scoring, {info['parameters']:,}-param qwen2 (V={info['vocab_size']:,}), prompt {n_prompt} tokens, "
          f"{len(comps)} actions, median of {args.repeats}, {result['device']} ({result['threads']} threads)")
    print(f"{'method':<40}{'wall ms/step':>14}{'CPU ms/step':>13}")
    print(f"{'full encoding of every (prompt, action)':<40}{t_full * 1e3:>14.1f}{c_full * 1e3:>13.1f}")
    print(f"{'shared prefix (KV cache, batched)':<40}{t_shared * 1e3:>14.1f}{c_shared * 1e3:>13.1f}")
    print(f"speed-up {result['speedup']:.2f}x wall, {result['speedup_cpu']:.2f}x CPU time "
          f"(max |score diff| {max_diff:.2e}); log-prob memory over "
          f"logits {tuple(logits.shape)}: naive fp32 {naive_bytes / 2**20:.0f} MiB vs chunked "
          f"{chunk_bytes / 2**20:.0f} MiB  -> {out}")
    return result


def _chunk_peak_bytes(logits) -> int:
    """Bytes of the largest fp32 temporary the chunked log-prob allocates for these logits (one chunk + its
    logsumexp), computed from the chunk size the function uses."""
    from r2v.policies.logprobs import _chunk_rows

    rows = min(_chunk_rows(logits.shape[-1], None), logits.shape[0] * logits.shape[1])
    return rows * logits.shape[-1] * 4 + logits.shape[0] * logits.shape[1] * 4 * 2


if __name__ == "__main__":
    main()
