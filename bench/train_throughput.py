"""BC training throughput: Ray Train + DeepSpeed (N CPU/GPU workers), with our own loop and with TRL's
SFTTrainer (`bc.trainer`), vs a plain single-process PyTorch loop.

    python -m bench.train_throughput [--rows 768 --epochs 3 --workers 2 --zero-stage 2 --batch 16]

Same synthetic teacher steps, same tiny model (built from config, no download), same global batch
(per-worker batch x workers for Ray; the whole global batch in one process for the plain loop), same
epochs. "loop tok/s" counts the tokens (prompt + completion, no padding) of the training steps over the
time spent in forward/backward/optimizer steps (for TRL: the epoch's wall time, its data loading and trainer hooks
included, so the comparison is conservative for TRL); "end-to-end tok/s" divides by the whole wall time including
Ray Train's worker start-up, DeepSpeed init, checkpoints and the final consolidated save.
The Ray runs alternate the two trainers' order per repeat (an even --repeats cancels a linear drift in load).
Writes runs/bench/train_throughput.json.

    python -m bench.train_throughput --dpo-experiment runs/quickstart [--dpo-config conf/quickstart.yaml --repeats 2]

DPO instead (`dpo_section`): `dpo.trainer` r2v vs trl on a finished run's real pairs, the same tokens/s columns plus
the validation reward accuracy and margin; writes runs/bench/train_throughput_dpo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

ROOMS = ["kitchen", "cellar", "garden", "attic", "hall", "study", "pantry", "vault", "library", "forge"]
ITEMS = ["key", "apple", "lamp", "coin", "map", "sword", "book", "rope"]
VERBS = ["take", "open", "eat", "read", "go", "drop", "examine", "unlock"]


def synthetic_steps(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        room, item = rng.choice(ROOMS), rng.choice(ITEMS)
        history = [f"{rng.choice(VERBS)} {rng.choice(ITEMS)}" for _ in range(rng.randint(0, 4))]
        obs = (f"You are in the {room}. You see a {item} and a door to the {rng.choice(ROOMS)}. "
               + " ".join(f"There is a {rng.choice(ITEMS)} here." for _ in range(rng.randint(1, 5))))
        rows.append({
            "experiment": "bench", "env": "toy", "task_id": f"t{i % 50}", "split": "train" if i % 8 else "val",
            "episode_id": f"e{i}", "policy": "teacher", "perturbation_seed": 0, "step": len(history),
            "goal": f"find the {item} and bring it to the {rng.choice(ROOMS)}", "observation": obs,
            "history": history, "action": f"{rng.choice(VERBS)} {item}", "actor": "teacher",
        })
    return rows


def plain_loop(model_dir: Path, examples: list[dict], batch: int, epochs: int, lr: float, max_tokens: int,
               seed: int = 0) -> dict:
    """The same SFT objective in one process: no Ray, no DeepSpeed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2v.config import resolve_device
    from r2v.train.common import encode, pad_batch, token_logps

    device = torch.device(resolve_device("auto"))
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    feats = [encode(tok, e["prompt"], e["completion"], max_tokens) for e in examples]
    rng = random.Random(seed)
    loop_s, tokens, losses = 0.0, 0, []
    t_all = time.perf_counter()
    for _ in range(epochs):
        order = list(range(len(feats)))
        rng.shuffle(order)
        ep_loss, ep_n = 0.0, 0
        for i in range(0, len(order), batch):
            t0 = time.perf_counter()
            b = pad_batch([feats[j] for j in order[i : i + batch]], tok.pad_token_id, device)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            nll = -token_logps(logits, b["input_ids"]) * b["loss_mask"]
            loss = nll.sum() / b["loss_mask"].sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            loop_s += time.perf_counter() - t0
            tokens += int(b["attention_mask"].sum())
            ep_loss += float(nll.sum().detach())
            ep_n += int(b["loss_mask"].sum())
        losses.append(ep_loss / max(1, ep_n))
    wall = time.perf_counter() - t_all
    return {"loop_tokens_per_s": tokens / loop_s, "end_to_end_tokens_per_s": tokens / wall, "wall_s": wall,
            "tokens": tokens, "losses": losses, "device": str(device), "threads": torch.get_num_threads()}


def dpo_section(experiment: Path, config: str, repeats: int, out: Path) -> dict:
    """`dpo.trainer` r2v vs trl on a finished run's real pairs (`<experiment>/pairs`, reference and init
    `<experiment>/models/bc`) with `config`'s dpo section: loop and end-to-end tokens/s, and the validation reward
    accuracy/margin of the epoch each run keeps (best `val_objective`) and of its last epoch."""
    import ray

    from r2v.config import load_config
    from r2v.experiment import Experiment
    from r2v.train.dpo import run_train_dpo

    runs: dict[str, list[dict]] = {"r2v": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="r2v-bench-dpo-") as tmp:
        for rep in range(repeats):
            for trainer in ("r2v", "trl") if rep % 2 == 0 else ("trl", "r2v"):  # alternate: cancels load drift
                cfg = load_config(config, [f"experiment=dpo-{trainer}{rep}", f"runs_dir={tmp}", "tracking.enabled=false",
                                           f"dpo.trainer={trainer}"])
                exp = Experiment(cfg)
                exp.model("bc").parent.mkdir(parents=True, exist_ok=True)
                os.symlink((experiment / "models" / "bc").resolve(), exp.model("bc"))
                os.symlink((experiment / "pairs").resolve(), exp.pairs)
                t0 = time.perf_counter()
                summary = run_train_dpo(cfg)
                wall = time.perf_counter() - t0
                hist = summary["epochs"]
                kept = hist[summary.get("best_epoch", len(hist)) - 1]
                tokens = sum(h["tokens"] for h in hist)
                runs[trainer].append({
                    "loop_tokens_per_s": tokens / sum(h["tokens"] / h["tokens_per_s"] for h in hist),
                    "end_to_end_tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens,
                    "best_epoch": summary.get("best_epoch"), "val_accuracy": kept["val_accuracy"],
                    "val_margin": kept["val_margin"], "val_objective": kept["val_objective"],
                    "last_val_accuracy": hist[-1]["val_accuracy"], "last_val_margin": hist[-1]["val_margin"],
                    "train_pairs": summary["num_train_examples"], "val_pairs": summary["num_val_examples"]})
        ray.shutdown()
    keys = ("loop_tokens_per_s", "end_to_end_tokens_per_s", "wall_s", "val_accuracy", "val_margin", "val_objective")
    result = {"experiment": str(experiment), "config": config, "repeats": repeats, "statistic": "median over repeats",
              "cpus": os.cpu_count(), "load_avg_after": os.getloadavg(),
              **{t: {"runs": r, **{k: statistics.median(x[k] for x in r) for k in keys}} for t, r in runs.items()}}
    result["ratio_trl_vs_loop"] = result["trl"]["loop_tokens_per_s"] / result["r2v"]["loop_tokens_per_s"]
    result["ratio_trl_vs_loop_end_to_end"] = (result["trl"]["end_to_end_tokens_per_s"]
                                              / result["r2v"]["end_to_end_tokens_per_s"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nDPO ({config}, {runs['r2v'][0]['train_pairs']} train / {runs['r2v'][0]['val_pairs']} val pairs), "
          f"median of {repeats} runs")
    print(f"{'dpo.trainer':<14}{'loop tok/s':>12}{'end-to-end tok/s':>18}{'wall s':>9}{'val acc':>9}{'val margin':>12}")
    for t in ("r2v", "trl"):
        r = result[t]
        print(f"{t:<14}{r['loop_tokens_per_s']:>12.0f}{r['end_to_end_tokens_per_s']:>18.0f}{r['wall_s']:>9.1f}"
              f"{r['val_accuracy']:>9.3f}{r['val_margin']:>12.4f}")
    print(f"TRL/own loop: loop {result['ratio_trl_vs_loop']:.2f}x, end-to-end "
          f"{result['ratio_trl_vs_loop_end_to_end']:.2f}x  -> {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dpo-experiment", type=Path, default=None,
                    help="instead of BC: DPO on this finished run's pairs and models/bc, dpo.trainer r2v vs trl")
    ap.add_argument("--dpo-config", default="conf/quickstart.yaml", help="the config whose dpo section --dpo-experiment uses")
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="per-worker micro-batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    args = ap.parse_args(argv)
    if args.dpo_experiment is not None:
        out = Path(args.out).with_name("train_throughput_dpo.json") if args.out == ap.get_default("out") else Path(args.out)
        return dpo_section(args.dpo_experiment, args.dpo_config, args.repeats, out)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from r2v.config import R2VConfig, TinyModelConfig
    from r2v.data import ShardStore, shard_key
    from r2v.experiment import Experiment
    from r2v.policies.init_model import save_tiny_model
    from r2v.train.bc import bc_examples, run_train_bc

    load_before = os.getloadavg()
    plains, rays = [], {"r2v": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="r2v-bench-train-") as tmp:
        base = R2VConfig(experiment="bench", runs_dir=tmp)
        rows = synthetic_steps(args.rows)
        ShardStore(Experiment(base).rollouts("teacher"), "steps").write(shard_key(part=0), rows)
        train, _, _ = bc_examples(base)
        model_dir = Path(tmp) / "init"
        arch = TinyModelConfig()  # the quickstart SLM's shape
        info = save_tiny_model([e["prompt"] + e["completion"] for e in train], arch, model_dir,
                               max_positions=max(base.model.max_context_tokens, arch.max_position_embeddings))
        # the plain loops run before Ray starts: an idle Ray (raylet, GCS, prestarted workers) next to an
        # OpenMP loop that uses every core slows the loop down several-fold on a 2-core box
        import torch

        threads = torch.get_num_threads()
        for rep in range(args.repeats):
            plains.append(plain_loop(model_dir, train, args.batch * args.workers, args.epochs, args.lr,
                                     base.model.max_context_tokens))
        torch.set_num_threads(1)
        plain_1t = plain_loop(model_dir, train, args.batch * args.workers, args.epochs, args.lr,
                              base.model.max_context_tokens)
        torch.set_num_threads(threads)
        # own loop and TRL alternate (r2v trl, trl r2v, ...): on a shared box the load drifts within a run, and a
        # fixed order hands that drift to one trainer (seen: TRL/own 1.51x and 0.59x in two runs of the same code)
        for rep in range(args.repeats):
            for trainer in ("r2v", "trl") if rep % 2 == 0 else ("trl", "r2v"):
                cfg = R2VConfig(experiment=f"bench-{trainer}{rep}", runs_dir=tmp)  # a fresh run each time (no reuse)
                Experiment(cfg).rollouts_dir.mkdir(parents=True, exist_ok=True)
                os.symlink(Experiment(base).rollouts("teacher"), Experiment(cfg).rollouts("teacher"))
                cfg.tracking.enabled = False
                cfg.ray.num_cpus = max(2, args.workers)
                cfg.model.path = str(model_dir)
                b = cfg.bc
                b.num_workers, b.zero_stage, b.per_device_batch_size = args.workers, args.zero_stage, args.batch
                b.learning_rate, b.epochs, b.save_steps, b.use_gpu = args.lr, float(args.epochs), 10**9, args.use_gpu
                b.lr_schedule = "constant"  # the plain loop's optimiser: the same updates, so the final losses compare
                b.trainer = trainer
                t0 = time.perf_counter()
                summary = run_train_bc(cfg)
                wall = time.perf_counter() - t0
                hist = summary["epochs"]
                tokens = sum(h["tokens"] for h in hist)
                rays[trainer].append({"loop_tokens_per_s": tokens / sum(h["tokens"] / h["tokens_per_s"] for h in hist),
                                      "end_to_end_tokens_per_s": tokens / wall, "wall_s": wall,
                                      "losses": [h["loss"] for h in hist], "tokens": tokens})
        ray.shutdown()

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    def summary_of(runs):
        return {"workers": args.workers, "zero_stage": args.zero_stage, "runs": runs,
                **{k: median(runs, k) for k in ("loop_tokens_per_s", "end_to_end_tokens_per_s", "wall_s")},
                "losses": runs[-1]["losses"]}

    r, trl = summary_of(rays["r2v"]), summary_of(rays["trl"])
    plain = {"runs": plains, "threads": plains[0]["threads"], "device": plains[0]["device"],
             **{k: median(plains, k) for k in ("loop_tokens_per_s", "end_to_end_tokens_per_s", "wall_s")},
             "losses": plains[-1]["losses"], "one_thread": plain_1t}
    result = {
        "model": {"params": info["params"], "vocab": info["vocab"], "arch": arch.architecture},
        "rows": args.rows, "train_examples": len(train), "epochs": args.epochs, "global_batch": args.batch * args.workers,
        "repeats": args.repeats, "statistic": "median over repeats",
        "load_avg_before_after": [load_before, os.getloadavg()], "cpus": os.cpu_count(),
        "ray_deepspeed": r,
        "ray_trl_sft": trl,
        "plain_torch": plain,
    }
    result["ratio_loop"] = r["loop_tokens_per_s"] / plain["loop_tokens_per_s"]
    result["ratio_loop_vs_1thread"] = r["loop_tokens_per_s"] / plain_1t["loop_tokens_per_s"]
    result["ratio_end_to_end"] = r["end_to_end_tokens_per_s"] / plain["end_to_end_tokens_per_s"]
    result["ratio_trl_vs_loop"] = trl["loop_tokens_per_s"] / r["loop_tokens_per_s"]
    result["ratio_trl_vs_loop_end_to_end"] = trl["end_to_end_tokens_per_s"] / r["end_to_end_tokens_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\nBC throughput, {info['params']:,}-param {arch.architecture}, {len(train)} examples x {args.epochs} epochs, "
          f"global batch {args.batch * args.workers}, "
          f"median of {args.repeats} runs, load avg {load_before[0]:.1f}")
    print(f"{'method':<34}{'loop tok/s':>12}{'end-to-end tok/s':>18}{'wall s':>9}{'final loss':>12}")
    ray_label = f"Ray Train + DeepSpeed ZeRO-{args.zero_stage} x{args.workers}"
    plain_label = f"plain PyTorch, 1 process ({plain['threads']} thr)"
    print(f"{ray_label:<34}{r['loop_tokens_per_s']:>12.0f}"
          f"{r['end_to_end_tokens_per_s']:>18.0f}{r['wall_s']:>9.1f}{r['losses'][-1]:>12.3f}")
    trl_label = f"TRL SFTTrainer, same Ray + ZeRO-{args.zero_stage}"
    print(f"{trl_label:<34}{trl['loop_tokens_per_s']:>12.0f}"
          f"{trl['end_to_end_tokens_per_s']:>18.0f}{trl['wall_s']:>9.1f}{trl['losses'][-1]:>12.3f}")
    print(f"{plain_label:<34}{plain['loop_tokens_per_s']:>12.0f}"
          f"{plain['end_to_end_tokens_per_s']:>18.0f}{plain['wall_s']:>9.1f}{plain['losses'][-1]:>12.3f}")
    p1 = plain["one_thread"]
    print(f"{'plain PyTorch, 1 process (1 thr)':<34}{p1['loop_tokens_per_s']:>12.0f}"
          f"{p1['end_to_end_tokens_per_s']:>18.0f}{p1['wall_s']:>9.1f}{p1['losses'][-1]:>12.3f}")
    print(f"ratio Ray/plain: loop {result['ratio_loop']:.2f}x (vs 1 thread {result['ratio_loop_vs_1thread']:.2f}x), "
          f"end-to-end {result['ratio_end_to_end']:.2f}x; TRL/own loop: loop {result['ratio_trl_vs_loop']:.2f}x, "
          f"end-to-end {result['ratio_trl_vs_loop_end_to_end']:.2f}x  -> {out}")
    return result


if __name__ == "__main__":
    main()
