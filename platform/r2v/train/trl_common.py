"""What TRL's trainers need to run like the own loop inside Ray Train: one place for `bc.trainer: trl`
(r2v.train.trl_sft) and `dpo.trainer: trl` (r2v.train.trl_dpo).

Same contract as the own DeepSpeed loop (r2v.train.common): the driver's `fit` starts a `TorchTrainer`, every rank
trains under DeepSpeed ZeRO (the config goes to the TRL config's `deepspeed` with "auto" batch/optimiser values, so
the trainer and DeepSpeed agree on them), the final checkpoint holds `hf/` (consolidated, LoRA merged) and
`trainer_state.json` with the per-epoch history, and `models/<kind>` is a plain HF directory.

* Checkpoints: `RayTrainReportCallback` copies every rank's HF checkpoint (weights, optimiser, DeepSpeed shards,
  trainer state) into Ray Train's storage on every save (`ray.train.huggingface.transformers.prepare_trainer`);
  after a worker failure Ray restarts the group and `trainer.train(resume_from_checkpoint=...)` continues there.
* Epoch rows (`EpochEnd`): the trainer keeps its loss sums in `epoch_sums` (no per-step sync) and turns the
  all-reduced sums into the row with its `summarize`; every rank then scores its share of the held-out data with the
  objective's `eval_stats` (one definition of every `val_*` number for both trainers). An objective with a
  `best_metric` keeps its best validation epoch's weights as the own loop does (rank 0, `best_weights.pt` in every
  later checkpoint, so a restart keeps them) and `hf/` holds those.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from r2v.errors import R2VError
from r2v.train.common import (
    BEST_FILE, HF_SUBDIR, STATE_FILE, WorkerContext, _all_reduce_sums, _improves, epoch_line, gather_state_dict,
    init_deepspeed_distributed, rank_partition, save_hf, setup_accelerator_env, validate,
)
from r2v.train.deepspeed_config import trl_ds_config

HISTORY_KEY = "r2v_epoch"  # our per-epoch rows live in the HF trainer state's log_history (restored on resume)


def trl_setup(config: dict[str, Any]):
    """A rank's start: process group + DeepSpeed comm, the objective, tokenizer, this rank's share of the held-out
    examples encoded, and the Ray node of every rank. Returns (objective, ctx, nodes)."""
    setup_accelerator_env()
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoTokenizer

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    init_deepspeed_distributed(device)
    objective = config["objective_cls"](config)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = WorkerContext(rank=rank, world=world, device=device, tokenizer=tokenizer, config=config)
    val_examples = ray.get(config["val_ref"]) if config.get("val_ref") is not None else []
    vidx, ctx.val_weights = rank_partition(len(val_examples), rank, world, int(config["train"]["seed"]) + 1)
    ctx.val_features = [objective.encode(tokenizer, val_examples[i]) for i in vidx]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return objective, ctx, nodes


def trainer_args(config: dict[str, Any], ctx: WorkerContext) -> dict[str, Any]:
    """The `TrainingArguments` both TRL configs share: the own loop's optimiser (AdamW β=(0.9, 0.95), clip 1.0), its
    linear warm-up/decay schedule, ZeRO from config, no per-step logging (the epoch rows are `EpochEnd`'s) and no
    activation checkpointing (TRL's configs turn it on by default: a second forward in every backward; the own loop
    runs without it)."""
    train = config["train"]
    linear = train["lr_schedule"] == "linear"
    work = Path(tempfile.mkdtemp(prefix=f"r2v-trl-r{ctx.rank}-"))
    return dict(
        output_dir=str(work / "hf-checkpoints"),
        per_device_train_batch_size=int(train["per_device_batch_size"]),
        gradient_accumulation_steps=int(train["gradient_accumulation_steps"]),
        num_train_epochs=float(train["epochs"]),
        max_steps=int(train["max_steps"]),
        learning_rate=float(train["learning_rate"]),
        lr_scheduler_type="linear" if linear else "constant",
        warmup_steps=float(train["warmup_ratio"]) if linear else 0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        seed=int(train["seed"]), data_seed=int(train["seed"]),
        bf16=bool(config["bf16"]), use_cpu=ctx.device.type != "cuda",
        deepspeed=trl_ds_config(int(train["zero_stage"])),
        save_strategy="steps", save_steps=int(train["save_steps"]), save_total_limit=2,
        logging_strategy="no", eval_strategy="no", report_to=[],
        activation_checkpointing=False,
        disable_tqdm=True, remove_unused_columns=False,
    )


def epoch_end_callback(objective, ctx: WorkerContext):
    """The `TrainerCallback` that writes the epoch rows and keeps the best validation epoch (see the module doc).
    Set its `trainer` once the trainer exists; put it before `RayTrainReportCallback` (its `on_save` adds the best
    weights to the checkpoint that callback copies)."""
    import torch
    from transformers import TrainerCallback

    zero = int(ctx.config["train"]["zero_stage"])
    best_metric = getattr(objective, "best_metric", None)  # (row key, "min" | "max") or None: keep the last epoch

    class EpochEnd(TrainerCallback):
        def __init__(self):
            self.t0, self.trainer = time.perf_counter(), None
            self.best: dict[str, Any] | None = None  # {"epoch", "metric", "value"} of the best epoch so far
            self.best_sd: dict[str, Any] | None = None  # rank 0: that epoch's consolidated weights

        def restore(self, checkpoint: Path) -> None:
            """After a restart: the best epoch from the checkpoint's history, its weights from the checkpoint."""
            log_history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
            for row in (h[HISTORY_KEY] for h in log_history if HISTORY_KEY in h):
                self._consider(row)
            if ctx.rank == 0 and (checkpoint / BEST_FILE).is_file():
                self.best_sd = torch.load(checkpoint / BEST_FILE)

        def _consider(self, row: dict[str, Any]) -> bool:
            if best_metric and best_metric[0] in row and _improves(row[best_metric[0]], self.best, best_metric[1]):
                self.best = {"epoch": row["epoch"], "metric": best_metric[0], "value": row[best_metric[0]]}
                return True
            return False

        def on_epoch_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.trainer.epoch_sums.clear()

        def on_epoch_end(self, args, state, control, model=None, **kw):
            sums = self.trainer.epoch_sums
            totals = _all_reduce_sums(sums, sorted(sums), ctx.device)  # every rank ran the same steps: same keys
            row: dict[str, Any] = {"epoch": round(state.epoch or 0), "step": state.global_step,
                                   **self.trainer.summarize(totals)}
            row["tokens_per_s"] = row.get("tokens", 0.0) / max(1e-9, time.perf_counter() - self.t0)
            row.update(validate(model, objective, ctx))
            if self._consider(row):  # the row is all-reduced: every rank gathers (a collective under ZeRO-3)
                sd = gather_state_dict(self.trainer.model_wrapped, zero, ctx.rank)
                if ctx.rank == 0:
                    self.best_sd = sd
            state.log_history.append({HISTORY_KEY: row})
            if ctx.rank == 0:
                print(epoch_line(objective.name, row), flush=True)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:  # runs after HF's flow callback, which asks for a save here:
                control.should_save = False  # the final checkpoint is train_and_report's (hf/ + state), not a full one

        def on_save(self, args, state, control, **kw):
            if ctx.rank == 0 and self.best_sd is not None:
                torch.save(self.best_sd, Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_FILE)

    return EpochEnd()


def train_and_report(trainer, epoch_end, objective, ctx: WorkerContext, nodes: list[Any]) -> None:
    """Resume from Ray's checkpoint if the worker group was restarted, train, and report the final checkpoint
    (`hf/`: the best validation epoch's weights when the objective keeps one, else the last; `trainer_state.json`)."""
    import ray
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config, rank = ctx.config, ctx.rank
    resume, resumed_from = None, None
    ckpt = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME
            if src.is_dir():  # a mid-run HF checkpoint (the final one, hf/ + state, is never resumed from)
                resume = str(Path(trainer.args.output_dir).parent / "resume")
                shutil.copytree(src, resume)
                resumed_from = json.loads((src / "trainer_state.json").read_text())["global_step"]
                epoch_end.restore(Path(resume))
                if rank == 0:
                    print(f"[{objective.name}] resumed from checkpoint at step {resumed_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume)

    history = [h[HISTORY_KEY] for h in trainer.state.log_history if HISTORY_KEY in h]
    train = config["train"]
    best = epoch_end.best
    # the same choice on every rank (the rows are all-reduced): gathering is a collective under ZeRO-3
    sd = epoch_end.best_sd if best else gather_state_dict(trainer.model_wrapped, int(train["zero_stage"]), rank)
    # the trainer left ZeRO-3 model construction switched on process-wide; rank 0 rebuilds the model alone
    unset_hf_deepspeed_config()
    extra = {"trainer": "trl", **(getattr(objective, "extra_metrics", None) or {})}
    with tempfile.TemporaryDirectory(prefix="r2v-trl-final-") as d:
        if rank == 0:
            if sd is None:
                raise R2VError(f"the best `{objective.name}` epoch's weights are missing from the checkpoint")
            save_hf(sd, config["model_path"], config.get("lora"), ctx.tokenizer, Path(d) / HF_SUBDIR)
            (Path(d) / STATE_FILE).write_text(json.dumps({
                "micro": trainer.state.global_step * int(train["gradient_accumulation_steps"]), "history": history,
                "final": True, "resumed_from_step": resumed_from, "best": best, "trainer": "trl"}))
        ray.train.report({"step": trainer.state.global_step, "history": history, "resumed_from_step": resumed_from,
                          "final": True, "worker_nodes": nodes, "best": best, "extra": extra},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


__all__ = ["HISTORY_KEY", "epoch_end_callback", "train_and_report", "trainer_args", "trl_setup"]
