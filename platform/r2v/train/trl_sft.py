"""BC on TRL's `SFTTrainer` inside Ray Train (`bc.trainer: trl`): the ecosystem's trainer on our data.

Same contract as the own DeepSpeed loop (r2v.train.common): the driver's `fit` starts a `TorchTrainer`, every
rank trains under DeepSpeed ZeRO (the config goes to `SFTConfig.deepspeed` with "auto" batch/optimiser values,
so the trainer and DeepSpeed agree on them), the final checkpoint holds `hf/` (consolidated, LoRA merged) and
`trainer_state.json` with the per-epoch history, and `models/bc` is a plain HF directory.

* Data: the teacher step shards as one Arrow table in the object store; each rank wraps it in a
  `datasets.Dataset` (no row copies) and `map`s it to `input_ids` + `labels` (−100 on the prompt) with the
  token split scoring uses (`r2v.policies.prompts.encode_pair`), so TRL trains on exactly our completion tokens.
* Checkpoints: `RayTrainReportCallback` copies every rank's HF checkpoint (weights, optimiser, DeepSpeed shards,
  trainer state) into Ray Train's storage on every save (`ray.train.huggingface.transformers.prepare_trainer`);
  after a worker failure Ray restarts the group and `trainer.train(resume_from_checkpoint=...)` continues there.
* Validation: at each epoch's end every rank scores its share of the held-out steps with `SFTObjective.eval_stats`
  (val loss and the rank accuracy a rank-mode policy acts with: one definition for both trainers).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from r2v.train.common import (
    HF_SUBDIR, STATE_FILE, WorkerContext, epoch_line, gather_state_dict, init_deepspeed_distributed, load_model,
    rank_partition, save_hf, setup_accelerator_env, validate,
)
from r2v.train.deepspeed_config import trl_ds_config

HISTORY_KEY = "r2v_epoch"  # our per-epoch rows live in the HF trainer state's log_history (restored on resume)


def tokenized_dataset(table, tokenizer, history_steps: int, max_tokens: int, chars: dict[str, int]):
    """`datasets.Dataset` over the Arrow table of labelled teacher steps → input_ids and labels (prompt = −100)."""
    import datasets

    from r2v.policies.prompts import completion, encode_pair, prompt_from_row

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            ids, n_prompt = encode_pair(tokenizer, prompt_from_row(row, history_steps, **chars),
                                        completion(row["label"]), max_tokens)
            out["input_ids"].append(ids)
            out["labels"].append([-100] * n_prompt + ids[n_prompt:])
        return out

    ds = datasets.Dataset(table)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize teacher steps")


def sft_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker function of `bc.trainer: trl`."""
    setup_accelerator_env()
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    init_deepspeed_distributed(device)
    train: dict[str, Any] = config["train"]
    seed = int(train["seed"])
    objective = config["objective_cls"](config)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = WorkerContext(rank=rank, world=world, device=device, tokenizer=tokenizer, config=config)
    val_examples = ray.get(config["val_ref"]) if config.get("val_ref") is not None else []
    vidx, ctx.val_weights = rank_partition(len(val_examples), rank, world, seed + 1)
    ctx.val_features = [objective.encode(tokenizer, val_examples[i]) for i in vidx]
    objective.prepare(ctx)
    train_ds = tokenized_dataset(ray.get(config["train_ref"]), tokenizer, int(config["history_steps"]),
                                 int(config["max_tokens"]), config["prompt_chars"])
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    class EpochEnd(TrainerCallback):
        """Held-out loss and rank accuracy per epoch, via the objective both trainers share."""

        def __init__(self):
            self.t0, self.tokens0 = time.perf_counter(), 0

        def on_epoch_begin(self, args, state, control, **kw):
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = round(state.epoch or 0)
            losses = [h["loss"] for h in state.log_history if "loss" in h and h.get("epoch", 0) > epoch - 1 + 1e-9]
            row: dict[str, Any] = {"epoch": epoch, "step": state.global_step}
            if losses:
                row["loss"] = sum(losses) / len(losses)
            row["tokens"] = float(state.num_input_tokens_seen - self.tokens0)  # all ranks, without padding
            row["tokens_per_s"] = row["tokens"] / max(1e-9, time.perf_counter() - self.t0)
            row.update(validate(model, objective, ctx))
            state.log_history.append({HISTORY_KEY: row})
            if rank == 0:
                print(epoch_line(objective.name, row), flush=True)

    work = Path(tempfile.mkdtemp(prefix=f"r2v-trl-sft-r{rank}-"))
    use_gpu = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(work / "hf-checkpoints"),
        per_device_train_batch_size=int(train["per_device_batch_size"]),
        gradient_accumulation_steps=int(train["gradient_accumulation_steps"]),
        num_train_epochs=float(train["epochs"]),
        max_steps=int(train["max_steps"]),
        learning_rate=float(train["learning_rate"]),
        lr_scheduler_type="linear" if train["lr_schedule"] == "linear" else "constant",
        warmup_steps=float(train["warmup_ratio"]) if train["lr_schedule"] == "linear" else 0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        seed=seed, data_seed=seed,
        bf16=bool(config["bf16"]), use_cpu=not use_gpu,
        deepspeed=trl_ds_config(int(train["zero_stage"])),
        save_strategy="steps", save_steps=int(train["save_steps"]), save_total_limit=2,
        logging_strategy="steps", logging_steps=1, eval_strategy="no", report_to=[],
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True, max_length=int(config["max_tokens"]),
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
    )
    model = load_model(config["model_path"], config.get("lora"), seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                         callbacks=[EpochEnd(), RayTrainReportCallback()])
    trainer = prepare_trainer(trainer)

    resume, resumed_from = None, None
    ckpt = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME
            if src.is_dir():  # a mid-run HF checkpoint (the final one, hf/ + state, is never resumed from)
                import shutil

                resume = str(work / "resume")
                shutil.copytree(src, resume)
                resumed_from = json.loads((src / "trainer_state.json").read_text())["global_step"]
                if rank == 0:
                    print(f"[{objective.name}] resumed from checkpoint at step {resumed_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume)

    history = [h[HISTORY_KEY] for h in trainer.state.log_history if HISTORY_KEY in h]
    zero = int(train["zero_stage"])
    sd = gather_state_dict(trainer.model_wrapped, zero, rank)  # a collective under ZeRO-3: every rank calls it
    # the trainer left ZeRO-3 model construction switched on process-wide; rank 0 rebuilds the model alone
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    with tempfile.TemporaryDirectory(prefix="r2v-trl-final-") as d:
        if rank == 0:
            save_hf(sd, config["model_path"], config.get("lora"), tokenizer, Path(d) / HF_SUBDIR)
            (Path(d) / STATE_FILE).write_text(json.dumps({
                "micro": trainer.state.global_step * int(train["gradient_accumulation_steps"]), "history": history,
                "final": True, "resumed_from_step": resumed_from, "trainer": "trl"}))
        ray.train.report({"step": trainer.state.global_step, "history": history, "resumed_from_step": resumed_from,
                          "final": True, "worker_nodes": nodes, "extra": {"trainer": "trl"}},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


__all__ = ["sft_worker", "tokenized_dataset"]
