"""The Ray Train + DeepSpeed loop shared by BC and DPO, and the token-level helpers both losses use.

Shape of a run (`fit`):

* The driver reads and validates the Parquet shards, renders (prompt, completion) texts, and puts them in
  the Ray object store once (`ray.put`); workers fetch them by reference, so nothing assumes a shared disk
  except Ray Train's own `storage_path`.
* Each of `num_workers` Ray Train workers tokenizes only its own partition: a fixed, seeded, equal-sized
  split of the examples (DistributedSampler-style: the last few indices wrap around so every rank runs
  the same number of steps, which DeepSpeed's collectives need), reshuffled locally every epoch. This is
  deterministic, so a restarted worker group resumes at exactly the micro-batch after the checkpoint.
  (We do not feed a Ray Data `get_dataset_shard` iterator: its streaming split is neither deterministic
  nor seekable, which makes exact mid-epoch resume and per-rank reference log-probs much harder.)
* `deepspeed.initialize` with `train_ds_config` (ZeRO stage from config; gloo on CPU, NCCL on GPUs).
* Every `save_steps` optimizer steps and at the end, **every** rank saves its DeepSpeed shard into a
  temp dir and calls `ray.train.report(metrics, checkpoint=...)`; Ray merges the per-rank files into one
  checkpoint. After a worker failure Ray restarts the group (`FailureConfig`) and `ray.train.get_checkpoint()`
  brings back the DeepSpeed state plus `trainer_state.json` (micro-step, carried epoch sums, history).
* The final checkpoint also holds `hf/`: the consolidated weights (ZeRO-3 parameters gathered one at a time,
  LoRA merged) saved with `save_pretrained` + the tokenizer. The driver copies it to `models/<kind>`.
* An objective with a `best_metric` (e.g. DPO: `("val_objective", "min")`) keeps its best validation epoch: the
  weights are gathered whenever the metric improves, kept on rank 0 (and in every later checkpoint as
  `best_weights.pt`, so a restart keeps them), and `hf/` holds those instead of the last epoch's.

An `Objective` (BC's SFT loss, DPO's loss) plugs in the data encoding, collation and loss.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from r2v.config import R2VConfig, TrainConfig
from r2v.errors import R2VError
from r2v.experiment import Experiment

log = logging.getLogger("r2v.train")

IGNORE = -100
STATE_FILE = "trainer_state.json"
BEST_FILE = "best_weights.pt"  # rank 0's consolidated weights of the best validation epoch so far
DS_TAG = "ds"
HF_SUBDIR = "hf"


# ----------------------------------------------------------------------------------------- environment
def setup_accelerator_env() -> None:
    """DeepSpeed must be told it is on CPU before it is imported, and only where there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_deepspeed_distributed(device) -> None:
    """DeepSpeed's comm on top of the process group Ray Train made (gloo on CPU, NCCL on GPUs). Needed before
    any DeepSpeed config is built: ZeRO-3 model loading sizes batches by its world size."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized()
                               else "nccl" if device.type == "cuda" else "gloo")


def use_bf16(train: TrainConfig, dtype: str) -> bool:
    return bool(train.use_gpu) and dtype in ("auto", "bfloat16")


# ----------------------------------------------------------------------------------------- tokens
def encode(tokenizer, prompt: str, completion_text: str, max_tokens: int) -> dict[str, Any]:
    """Token ids of prompt + completion + eos, the prompt cut from the left to fit `max_tokens`
    (r2v.policies.prompts.encode_pair: training and scoring share one token split)."""
    from r2v.policies.prompts import encode_pair

    ids, n_prompt = encode_pair(tokenizer, prompt, completion_text, max_tokens)
    return {"input_ids": ids, "n_prompt": n_prompt}


def pad_batch(seqs: list[dict[str, Any]], pad_id: int, device=None) -> dict[str, Any]:
    """Right-padded input_ids/attention_mask plus two masks over the *targets* (shifted by one):
    `loss_mask` (completion tokens incl. eos) and `action_mask` (completion tokens without the final eos)."""
    import torch

    width = max(len(s["input_ids"]) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width - 1), dtype=torch.bool)
    action_mask = torch.zeros((n, width - 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        L, p = len(s["input_ids"]), s["n_prompt"]
        ids[i, :L] = torch.tensor(s["input_ids"], dtype=torch.long)
        attn[i, :L] = 1
        # target position j predicts token j+1: completion tokens are p..L-1 -> target positions p-1..L-2
        loss_mask[i, p - 1 : L - 1] = True
        action_mask[i, p - 1 : L - 2] = True  # without eos
    out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "action_mask": action_mask}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def token_logps(logits, input_ids):
    """log p(token_{j+1} | tokens_{<=j}) for every target position j (shape [B, T-1]), in fp32, computed
    chunk by chunk (r2v.policies.logprobs): no fp32 [B, T, V] log-softmax is ever materialised."""
    import torch

    from r2v.policies.logprobs import selective_logps

    # score every position against the next token (a dummy for the last) so `logits` is read in place,
    # never sliced into a copy
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return selective_logps(logits, targets)[:, :-1]


def sequence_logps(logits, batch):
    """Summed completion log-prob per row (the quantity DPO compares and the ranking policy scores)."""
    return (token_logps(logits, batch["input_ids"]) * batch["loss_mask"]).sum(-1)


# ----------------------------------------------------------------------------------------- partitioning
def rank_partition(n: int, rank: int, world: int, seed: int) -> tuple[list[int], list[float]]:
    """Indices of rank `rank` out of a seeded permutation of range(n), padded by wrapping around so that
    every rank gets ceil(n / world) of them; weight 0 marks a wrapped duplicate (excluded from metrics
    that must count each example once, e.g. validation loss)."""
    import random

    if n == 0:
        return [], []
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    per = math.ceil(n / world)
    total = per * world
    padded = [perm[i % n] for i in range(total)]
    idx = padded[rank::world]
    weights = [1.0 if rank + k * world < n else 0.0 for k in range(per)]
    return idx, weights


def epoch_order(n_local: int, seed: int, epoch: int) -> list[int]:
    import random

    order = list(range(n_local))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


# ----------------------------------------------------------------------------------------- objective
class Objective(Protocol):
    """What BC and DPO plug into the loop. Stat dicts hold *sums*; `weight` keys say what they average over."""

    name: str

    def encode(self, tokenizer, example: dict[str, Any]) -> dict[str, Any]: ...

    def prepare(self, ctx: "WorkerContext") -> None: ...

    def loss(self, model, features: list[dict[str, Any]], ctx: "WorkerContext"): ...

    def eval_stats(self, model, features: list[dict[str, Any]], weights: list[float],
                   ctx: "WorkerContext") -> dict[str, float]: ...

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]: ...


class WorkerContext:
    """What a worker knows about itself; handed to the objective."""

    def __init__(self, *, rank: int, world: int, device, tokenizer, config: dict[str, Any]):
        self.rank, self.world, self.device, self.tokenizer, self.config = rank, world, device, tokenizer, config
        self.train_features: list[dict[str, Any]] = []
        self.train_weights: list[float] = []
        self.val_features: list[dict[str, Any]] = []
        self.val_weights: list[float] = []

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------- model I/O
def load_model(path: str, lora: dict[str, Any] | None, seed: int):
    """The HF model to train (fp32 master weights; DeepSpeed casts for bf16), LoRA-wrapped if asked."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = lora_config(lora)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return model


def lora_config(lora: dict[str, Any] | None):
    """The `peft.LoraConfig` of `model.lora` (None when LoRA is off): one definition for training and saving."""
    if not (lora and lora.get("enabled")):
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")


def gather_state_dict(engine, zero_stage: int, rank: int) -> dict[str, Any] | None:
    """Full parameters + persistent buffers on rank 0 (None elsewhere). Under ZeRO-3 each parameter is
    gathered in turn (a collective: every rank must call this), as OpenRLHF's save_model does."""
    import deepspeed

    module = engine.module
    out: dict[str, Any] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=zero_stage == 3 and hasattr(p, "ds_id")):
            if rank == 0:
                out[name] = p.data.detach().to("cpu", copy=True)
    if rank == 0:
        keys = set(module.state_dict().keys())
        for name, b in module.named_buffers():
            if name in keys:
                out[name] = b.detach().to("cpu", copy=True)
    return out if rank == 0 else None


def save_hf(state_dict: dict[str, Any], model_path: str, lora: dict[str, Any] | None, tokenizer, out_dir: Path) -> None:
    """Rank 0: rebuild the architecture on CPU, load the gathered weights, merge LoRA, `save_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_config = lora_config(lora)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"}
    if unexpected or (set(missing) - tied):
        raise R2VError(f"consolidating weights failed: missing {sorted(set(missing) - tied)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")
    if peft_config is not None:
        model = model.merge_and_unload()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------- the worker loop
def _all_reduce_sums(sums: dict[str, float], keys: list[str], device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _add(into: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + float(v)


def _improves(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best["value"] if mode == "min" else value > best["value"])


def validate(model, objective: Objective, ctx: WorkerContext) -> dict[str, float]:
    """An epoch's held-out numbers (`val_*`), summed over every rank's share; {} without held-out data.
    A collective: every rank calls it."""
    if not ctx.val_features:
        return {}
    model.eval()
    sums = objective.eval_stats(model, ctx.val_features, ctx.val_weights, ctx)
    model.train()
    sums = _all_reduce_sums(sums, sorted(sums), ctx.device)
    return {f"val_{k}": v for k, v in objective.summarize(sums).items() if k != "tokens"}


def epoch_line(name: str, row: dict[str, Any]) -> str:
    return f"[{name}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function (BC and DPO)."""
    setup_accelerator_env()
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    import deepspeed
    from transformers import AutoTokenizer

    from r2v.train.deepspeed_config import train_ds_config

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    train: dict[str, Any] = config["train"]
    init_deepspeed_distributed(device)
    nodes: list[Any] = [None] * world  # the Ray node of each rank, for the summary (where did it run)
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    objective: Objective = config["objective_cls"](config)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = WorkerContext(rank=rank, world=world, device=device, tokenizer=tokenizer, config=config)

    train_examples = ray.get(config["train_ref"])
    val_examples = ray.get(config["val_ref"]) if config.get("val_ref") is not None else []
    seed = int(train["seed"])
    idx, ctx.train_weights = rank_partition(len(train_examples), rank, world, seed)
    ctx.train_features = [objective.encode(tokenizer, train_examples[i]) for i in idx]
    vidx, ctx.val_weights = rank_partition(len(val_examples), rank, world, seed + 1)
    ctx.val_features = [objective.encode(tokenizer, val_examples[i]) for i in vidx]
    del train_examples, val_examples
    objective.prepare(ctx)  # e.g. DPO: reference log-probs from the frozen model, before the policy exists

    mbs = int(train["per_device_batch_size"])
    ga = int(train["gradient_accumulation_steps"])
    n_local = len(ctx.train_features)
    micro_per_epoch = max(1, math.ceil(n_local / mbs))
    if int(train["max_steps"]) > 0:
        total_micro = int(train["max_steps"]) * ga
    else:
        total_micro = math.ceil(float(train["epochs"]) * micro_per_epoch / ga) * ga
    ds_config = train_ds_config(
        zero_stage=int(train["zero_stage"]), micro_batch_size=mbs, world_size=world, gradient_accumulation_steps=ga,
        learning_rate=float(train["learning_rate"]), bf16=bool(config["bf16"]),
        total_steps=total_micro // ga if train["lr_schedule"] == "linear" else None,
        warmup_ratio=float(train["warmup_ratio"]),
    )
    model = load_model(config["model_path"], config.get("lora"), seed)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
    )
    engine.train()

    save_every = max(1, int(train["save_steps"])) * ga

    state: dict[str, Any] = {"micro": 0, "carried": {}, "history": [], "resumed_from_step": None, "best": None}
    best_sd: dict[str, Any] | None = None  # rank 0: weights of state["best"]'s epoch
    best_metric = getattr(objective, "best_metric", None)  # (row key, "min" | "max") or None: keep the last epoch
    ckpt = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    if ckpt is None and config.get("resume_path"):  # the driver found an interrupted earlier run
        ckpt = ray.train.Checkpoint.from_directory(config["resume_path"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if rank == 0 and (Path(d) / BEST_FILE).is_file():
                best_sd = torch.load(Path(d) / BEST_FILE)
        state["resumed_from_step"] = state["micro"] // ga
        if rank == 0:
            print(f"[{objective.name}] resumed from checkpoint at step {state['resumed_from_step']}", flush=True)

    local: dict[str, float] = {}
    stat_keys: list[str] = []

    def report(metrics: dict[str, Any], final: bool, with_ckpt: bool) -> None:
        if not with_ckpt:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix=f"r2v-{objective.name}-ckpt-") as d:
            engine.save_checkpoint(d, tag=DS_TAG)
            if final:  # the same choice on every rank: gathering is a collective
                sd = best_sd if state.get("best") else gather_state_dict(engine, int(train["zero_stage"]), rank)
                if rank == 0:
                    if sd is None:
                        raise R2VError(f"the best `{objective.name}` epoch's weights are missing from the checkpoint")
                    save_hf(sd, config["model_path"], config.get("lora"), tokenizer, Path(d) / HF_SUBDIR)
            if rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps({**state, "final": final}))
                if best_sd is not None and not final:
                    torch.save(best_sd, Path(d) / BEST_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def flush_local() -> None:
        """All-reduce this rank's sums since the last flush into the carried (global) epoch sums."""
        nonlocal local
        keys = sorted(set(stat_keys) | set(local))
        _add(state["carried"], _all_reduce_sums(local, keys, device))
        local = {}

    while state["micro"] < total_micro:
        micro = state["micro"]
        epoch, pos = divmod(micro, micro_per_epoch)
        order = epoch_order(n_local, seed, epoch)
        batch_ids = order[pos * mbs : (pos + 1) * mbs]
        t0 = time.perf_counter()
        loss, stats = objective.loss(engine, [ctx.train_features[i] for i in batch_ids], ctx)
        engine.backward(loss)
        engine.step()
        stats["time_s"] = time.perf_counter() - t0
        stat_keys = sorted(set(stat_keys) | set(stats))
        _add(local, stats)
        state["micro"] = micro + 1
        step = state["micro"] // ga
        epoch_done = state["micro"] % micro_per_epoch == 0 or state["micro"] == total_micro
        if epoch_done:
            flush_local()
            sums = state["carried"]
            row = {"epoch": epoch + 1, "step": step, **objective.summarize(sums)}
            row["tokens_per_s"] = sums.get("tokens", 0.0) / max(1e-9, sums.get("time_s", 0.0) / world)
            row.update(validate(engine, objective, ctx))
            if best_metric and best_metric[0] in row and _improves(row[best_metric[0]], state.get("best"), best_metric[1]):
                state["best"] = {"epoch": epoch + 1, "metric": best_metric[0], "value": row[best_metric[0]]}
                sd = gather_state_dict(engine, int(train["zero_stage"]), rank)  # every rank: the row is all-reduced
                if rank == 0:
                    best_sd = sd
            state["history"].append(row)
            state["carried"] = {}
            if rank == 0:
                print(epoch_line(objective.name, row), flush=True)
        final = state["micro"] == total_micro
        if final or state["micro"] % save_every == 0:
            if not epoch_done:
                flush_local()
            metrics = {"step": step, "history": state["history"], "resumed_from_step": state["resumed_from_step"],
                       "final": final, "worker_nodes": nodes, "best": state.get("best"),
                       "extra": dict(getattr(objective, "extra_metrics", {}) or {})}
            report(metrics, final=final, with_ckpt=True)
        elif epoch_done:
            ray.train.report({"step": step, "epoch": epoch + 1})


# ----------------------------------------------------------------------------------------- the driver side
def run_name(kind: str, cfg_part: dict[str, Any], data_files: list[Path]) -> str:
    """A Ray Train run name keyed by the stage's config and input files: re-running the same stage after a
    driver crash finds the interrupted run's checkpoints (`latest_checkpoint`); a changed config or data
    set starts a new run."""
    h = hashlib.sha256(json.dumps(cfg_part, sort_keys=True, default=str).encode())
    for f in data_files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{kind}-{h.hexdigest()[:10]}"


def latest_checkpoint(run_dir: Path, world: int, zero_stage: int) -> Path | None:
    """The newest complete checkpoint of an earlier run of the same name (Ray Train V2 does not restore
    across driver runs by itself). Complete = trainer state + every rank's DeepSpeed shard."""
    if not run_dir.is_dir():
        return None
    for d in sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), reverse=True):
        ds = d / DS_TAG
        if not (d / STATE_FILE).is_file() or not ds.is_dir():
            continue
        if zero_stage >= 1 and len(list(ds.glob("*zero_pp_rank_*_optim_states.pt"))) != world:
            continue
        if zero_stage < 3 and not (ds / "mp_rank_00_model_states.pt").is_file():
            continue
        try:
            json.loads((d / STATE_FILE).read_text())
        except json.JSONDecodeError:
            continue
        return d
    return None


def fit(cfg: R2VConfig, *, kind: str, objective_cls, train: TrainConfig, model_path: str, out_dir: Path,
        train_examples: list[dict[str, Any]], val_examples: list[dict[str, Any]], extra: dict[str, Any],
        data_files: list[Path], worker=None) -> dict[str, Any]:
    """Run one Ray Train job and copy the consolidated HF model to `out_dir`. Returns the summary.
    `worker`: the per-rank function (default `train_worker`, the own loop; BC may use TRL's, r2v.train.trl_sft);
    `train_examples` is whatever it reads from the object store (example dicts, or an Arrow table for TRL)."""
    from dataclasses import asdict

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from r2v.ray_utils import init_ray

    if not (Path(model_path) / "config.json").is_file():
        raise R2VError(f"{model_path} is not a Hugging Face model directory (no config.json); "
                       "run the stage that writes it first")
    if not train_examples:
        raise R2VError(f"`{kind}` has no training examples; check the inputs of the stage")
    init_ray(cfg)
    train_d = asdict(train)
    lora = asdict(cfg.model.lora)
    config = {
        "objective_cls": objective_cls,
        "model_path": str(Path(model_path).resolve()),
        "train": train_d,
        "lora": lora,
        "bf16": use_bf16(train, cfg.model.dtype),
        "max_tokens": int(cfg.model.max_context_tokens),
        "train_ref": ray.put(train_examples),
        "val_ref": ray.put(val_examples) if val_examples else None,
        **extra,
    }
    model_files = sorted(p for p in Path(model_path).iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    name = run_name(kind, {"train": train_d, "lora": lora, "model": config["model_path"],
                           "max_tokens": config["max_tokens"], "extra": extra}, list(data_files) + model_files)
    storage = Experiment(cfg).ray_results.resolve()
    prev = latest_checkpoint(storage / name, int(train.num_workers), int(train.zero_stage))
    if prev is not None:
        prev_state = json.loads((prev / STATE_FILE).read_text())
        if prev_state.get("final") and (prev / HF_SUBDIR / "config.json").is_file():
            # the same run already finished (its model may have been deleted since): reuse it
            _install(prev / HF_SUBDIR, out_dir)
            metrics = {"step": prev_state["micro"] // int(train.gradient_accumulation_steps),
                       "history": prev_state["history"], "resumed_from_step": prev_state.get("resumed_from_step"),
                       "best": prev_state.get("best")}
            return _summary(kind, out_dir, storage / name, metrics, train, train_examples, val_examples, 0.0,
                            reused=str(prev))
        config["resume_path"] = str(prev)
        log.warning("%s: resuming the interrupted run %s from %s", kind, name, prev.name)
    trainer = TorchTrainer(
        worker or train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=int(train.num_workers), use_gpu=bool(train.use_gpu)),
        run_config=RunConfig(
            storage_path=str(storage), name=name,
            failure_config=FailureConfig(max_failures=int(train.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise R2VError(f"`{kind}` finished without a checkpoint under {storage / name}")
    with result.checkpoint.as_directory() as d:
        hf = Path(d) / HF_SUBDIR
        if not (hf / "config.json").is_file():
            raise R2VError(f"the last `{kind}` checkpoint {result.checkpoint.path} holds no consolidated model")
        _install(hf, out_dir)
    return _summary(kind, out_dir, storage / name, result.metrics or {}, train, train_examples, val_examples, wall)


def _install(hf: Path, out_dir: Path) -> None:
    """Copy a consolidated HF dir to its final place, replacing what was there only once the copy is whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _summary(kind: str, out_dir: Path, run_dir: Path, metrics: dict[str, Any], train: TrainConfig,
             train_examples: list, val_examples: list, wall: float, reused: str | None = None) -> dict[str, Any]:
    history = list(metrics.get("history") or [])
    summary: dict[str, Any] = {
        "model_dir": str(out_dir),
        "run_dir": str(run_dir),
        "steps": metrics.get("step"),
        "epochs": history,
        "resumed_from_step": metrics.get("resumed_from_step"),
        "num_train_examples": len(train_examples),
        "num_val_examples": len(val_examples),
        "num_workers": int(train.num_workers),
        "worker_nodes": metrics.get("worker_nodes"),  # Ray node id per rank (None when a finished run was reused)
        "zero_stage": int(train.zero_stage),
        "train_wall_s": wall,
        **(metrics.get("extra") or {}),
    }
    if metrics.get("best"):  # the model saved is this validation epoch's, not the last one's
        summary["best_epoch"] = metrics["best"]["epoch"]
        summary[f"best_{metrics['best']['metric']}"] = metrics["best"]["value"]
    if reused:
        summary["reused_checkpoint"] = reused
    if history:
        last = history[-1]
        for k, v in last.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                summary[f"final_{k}"] = v
        first = history[0]
        if "loss" in first:
            summary["first_loss"] = first["loss"]
        summary["tokens_per_s"] = sum(h.get("tokens_per_s", 0.0) for h in history) / len(history)
    _log_epochs_to_mlflow(kind, history)
    return summary


def _log_epochs_to_mlflow(kind: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch curves into the active MLflow run (the pipeline's stage run), if there is one."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return
    if mlflow.active_run() is None:
        return
    for row in history:
        metrics = {f"{kind}/{k}": float(v) for k, v in row.items()
                   if k not in ("epoch", "step") and isinstance(v, (int, float)) and v == v}
        mlflow.log_metrics(metrics, step=int(row.get("epoch", 0)))


__all__ = ["encode", "pad_batch", "token_logps", "sequence_logps", "rank_partition", "fit", "train_worker",
           "setup_accelerator_env", "gather_state_dict", "save_hf", "load_model", "lora_config", "WorkerContext"]
