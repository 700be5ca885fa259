"""GPU smoke test on ONE GPU (run by scripts/gpu_smoke.sh): a ~0.5B-shaped random Qwen2 built locally (no
network), a few BC and DPO steps through the project's own stages (`run_train_bc`, `run_train_dpo`: Ray Train
+ DeepSpeed ZeRO-3, bf16), HF generation and rank scoring with the SLM policy, vLLM generation if vLLM is
installed, and one request to the project's Serve SLM deployment. Prints tokens/s and peak GPU memory per
part and exits non-zero at the first failure.

    python scripts/gpu_smoke.py WORKDIR [--preset 0.5b] [--steps 4] [--cpu-check]

`--cpu-check` (no GPU needed; what CI and a CPU box can verify): builds the tiny real-shape model, writes the
synthetic step and pair shards, reads them back through the stages' own readers (`bc_examples`,
`dpo_examples`) and encodes them with the chat template, then stops before anything needs a GPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))

ROOMS = ["kitchen", "cellar", "garden", "attic", "hall", "study", "pantry", "vault"]
ITEMS = ["key", "apple", "lamp", "coin", "map", "sword", "book", "rope"]
VERBS = ["take", "open", "eat", "read", "go", "drop", "examine", "unlock"]


def say(part: str, **kv) -> None:
    print(f"[gpu-smoke] {part}: " + json.dumps(kv, default=str), flush=True)


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def steps_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic teacher steps (the `steps` schema fields BC reads)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        room, item = rng.choice(ROOMS), rng.choice(ITEMS)
        history = [f"{rng.choice(VERBS)} {rng.choice(ITEMS)}" for _ in range(rng.randint(0, 4))]
        rows.append({
            "experiment": "gpu-smoke", "env": "toy", "task_id": f"t{i % 16}", "split": "train" if i % 8 else "val",
            "episode_id": f"e{i}", "policy": "teacher", "perturbation_seed": 0, "step": len(history),
            "goal": f"find the {item} and bring it to the {rng.choice(ROOMS)}",
            "observation": f"You are in the {room}. You see a {item}. " * rng.randint(1, 20),
            "history": history, "action": f"{rng.choice(VERBS)} {item}", "actor": "teacher",
            "admissible": [f"{v} {item}" for v in VERBS],
        })
    return rows


def pair_rows(steps: list[dict]) -> list[dict]:
    from r2v.policies.prompts import format_prompt

    out = []
    for i, r in enumerate(steps):
        prompt = format_prompt(r["goal"], r["history"], r["observation"], 8, 0, 0)
        out.append({"experiment": "gpu-smoke", "env": "toy", "task_id": r["task_id"], "episode_id": r["episode_id"],
                    "step": r["step"], "perturbation_seed": 1, "prompt": prompt, "chosen": r["action"],
                    "rejected": "drop " + r["action"].split()[-1] if not r["action"].startswith("drop") else "look",
                    "chosen_score": 1.0, "rejected_score": 0.0, "peer_prompt": prompt, "peer_seed": 2,
                    "split": r["split"], "chosen_source": "teacher"})
    return out


def cpu_check(cfg, model_dir: Path) -> None:
    """The stages' readers accept the synthetic shards and the examples encode through the chat template."""
    from transformers import AutoTokenizer

    from r2v.train.bc import bc_examples
    from r2v.train.common import encode
    from r2v.train.dpo import dpo_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template, f"{model_dir}: the real-shape tokenizer has no chat template"
    bc_train, bc_val, _ = bc_examples(cfg)
    pairs, val_pairs, _ = dpo_examples(cfg)
    for ex in bc_train[:4] + pairs[:4]:
        f = encode(tok, ex["prompt"], ex.get("completion") or ex["chosen"], cfg.model.max_context_tokens)
        assert len(f["input_ids"]) <= cfg.model.max_context_tokens and 0 < f["n_prompt"] < len(f["input_ids"])
    say("cpu-check", bc_train=len(bc_train), bc_val=len(bc_val), dpo_train=len(pairs), dpo_val=len(val_pairs))
    print("[gpu-smoke] CPU CHECK OK", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpu-check", action="store_true", help="check the data path on CPU and stop")
    args = ap.parse_args()

    import torch

    if args.cpu_check:
        args.preset = "tiny"
    elif not torch.cuda.is_available():
        raise SystemExit("[gpu-smoke] FAIL: torch sees no CUDA device (this script is for a GPU machine)")
    else:
        say("device", name=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)

    from r2v.config import load_config
    from r2v.data import ShardStore, shard_key
    from r2v.experiment import Experiment
    from r2v.policies.real_shape import make_real_shape_model

    work = args.work.resolve()
    t0 = time.time()
    info = make_real_shape_model(work / "init", args.preset, max_positions=2048)
    say("model", built_s=round(time.time() - t0, 1), **info)

    train = ["num_workers=1", "use_gpu=true", "zero_stage=3", f"max_steps={args.steps}", "per_device_batch_size=4",
             "save_steps=1000", "learning_rate=1e-5", "lr_schedule=constant"]
    cfg = load_config(None, [
        "experiment=gpu-smoke", f"runs_dir={work / 'runs'}", f"model.path={work / 'init'}",
        "model.build_from_config=false", "model.max_context_tokens=512",
        "model.device=" + ("cpu" if args.cpu_check else "cuda"), "model.dtype=" + ("float32" if args.cpu_check else "bfloat16"),
        "policy.history_steps=8", "policy.observation_chars=0", "policy.goal_chars=0", "policy.mode=rank",
        *[f"bc.{t}" for t in train], *[f"dpo.train.{t}" for t in train],
    ])
    exp = Experiment(cfg)
    steps = steps_rows(64)
    ShardStore(exp.rollouts("teacher"), "steps").write(shard_key(part=0), steps)
    ShardStore(exp.pairs, "pairs").write(shard_key(part=0), pair_rows(steps))
    if args.cpu_check:
        cpu_check(cfg, work / "init")
        return

    from r2v.train.bc import run_train_bc

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    bc = run_train_bc(cfg)
    say("bc (Ray Train + DeepSpeed ZeRO-3)", wall_s=round(time.time() - t0, 1), steps=bc.get("steps"),
        tokens_per_s=bc.get("tokens_per_s"), final_loss=bc.get("final_loss"))

    from r2v.train.dpo import run_train_dpo

    t0 = time.time()
    dpo = run_train_dpo(cfg)
    say("dpo (Ray Train + DeepSpeed ZeRO-3)", wall_s=round(time.time() - t0, 1), steps=dpo.get("steps"),
        tokens_per_s=dpo.get("tokens_per_s"), final_margin=dpo.get("final_margin"))
    model_dir = str(exp.model("dpo"))

    # HF generation and rank scoring with the project's SLM policy (bf16 on the GPU)
    from dataclasses import replace

    from r2v.envs.base import Observation, Task
    from r2v.policies.base import StepContext
    from r2v.policies.prompts import completion
    from r2v.policies.slm import SLMPolicy

    ctxs = [StepContext(Task(f"t{i}", "toy", r["goal"]), Observation(r["goal"], r["observation"], r["admissible"]),
                        [(a, "") for a in r["history"]], r["step"], 30) for i, r in enumerate(steps[:16])]
    torch.cuda.reset_peak_memory_stats()
    gen = SLMPolicy(model_dir, cfg.model, replace(cfg.policy, mode="generate", num_candidates=4, max_new_tokens=64))
    gen.generate(ctxs[:2])  # warm-up
    torch.cuda.synchronize()
    t0 = time.time()
    prompts = [gen.prompt(c) for c in ctxs]
    from r2v.policies.prompts import encode_prompt

    ids = [encode_prompt(gen.tokenizer, p, 448) for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([[gen.tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=gen.device)
    mask = (batch != gen.tokenizer.pad_token_id).long()
    with torch.no_grad():
        out = gen.model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                                 do_sample=True, pad_token_id=gen.tokenizer.pad_token_id)
    torch.cuda.synchronize()
    dt = time.time() - t0
    new = (out.shape[1] - width) * out.shape[0]
    say("hf generate (batch 16, 64 new tokens)", tokens_per_s=round(new / dt, 1), s=round(dt, 2),
        peak_gib=round(peak_gib(), 2))
    d = gen.act(ctxs[:4])
    assert all(x.candidates for x in d), "generate mode returned no candidates"

    rank = SLMPolicy(model_dir, cfg.model, cfg.policy)
    comps = [completion(a) for a in ctxs[0].observation.admissible]
    prompt = rank.prompt(ctxs[0])
    rank.score_actions(prompt, comps)
    for name, fn in (("full", functools.partial(rank.score, [prompt] * len(comps), comps)),
                     ("shared-prefix", functools.partial(rank.score_actions, prompt, comps))):
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(5):
            res = fn()
        torch.cuda.synchronize()
        say(f"rank scoring {name}", ms_per_step=round((time.time() - t0) / 5 * 1e3, 2), actions=len(comps))
    assert all(abs(a[0]) < 1e6 for a in res)
    del gen, rank
    torch.cuda.empty_cache()

    try:  # optional: vLLM is never a requirement
        import vllm  # noqa: F401
    except ImportError:
        say("vllm", skipped="not installed")
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model_dir, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=1024)
        t0 = time.time()
        outs = llm.generate(prompts, SamplingParams(max_tokens=64, min_tokens=64, temperature=0.8))
        dt = time.time() - t0
        say("vllm generate (16 prompts, 64 new tokens)", tokens_per_s=round(sum(len(o.outputs[0].token_ids)
                                                                               for o in outs) / dt, 1))
        del llm

    # one request to the project's Serve SLM deployment, on the GPU
    import ray
    from ray import serve

    from r2v.serve.app import SLMDeployment

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    handle = serve.run(SLMDeployment.options(ray_actor_options={"num_gpus": 1, "num_cpus": 1}).bind(
        model_dir, cfg.model, cfg.policy, 16, 0.005), name="gpu-smoke", route_prefix=None)
    t0 = time.time()
    decision = handle.act.remote(ctxs[0]).result(timeout_s=120)
    stats = handle.stats.remote().result(timeout_s=60)
    say("serve slm request", s=round(time.time() - t0, 2), action=decision.action, device=stats["device"])
    assert decision.action in ctxs[0].observation.admissible and stats["device"].startswith("cuda")
    serve.shutdown()
    ray.shutdown()
    print("[gpu-smoke] OK", flush=True)


if __name__ == "__main__":
    main()
