"""`bc.trainer: trl` without Ray: the lean SFTTrainer's loss is TRL's loss (and gradient) on our completion tokens."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")


def test_completion_logits_mask_marks_positions_whose_next_token_is_a_label():
    import torch

    from r2v.train.trl_sft import completion_logits_mask

    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 2]])
    assert completion_logits_mask(labels).tolist() == [[False, True, True, False, False],
                                                       [True, True, True, True, False]]


def test_lean_sft_trainer_loss_and_grads_match_stock_trl(tmp_path):
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from r2v.train.trl_sft import lean_sft_trainer

    rows = []
    g = torch.Generator().manual_seed(0)
    for n_prompt, n_completion in ((7, 2), (12, 3), (4, 1), (9, 4)):
        ids = torch.randint(3, 64, (n_prompt + n_completion,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    ds = datasets.Dataset.from_list(rows)
    arch = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>", unk_token="<unk>")

    def make(cls):
        torch.manual_seed(0)
        args = SFTConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, use_cpu=True,
                         report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
                         dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
        return cls(model=LlamaForCausalLM(arch), args=args, train_dataset=ds, processing_class=tok)

    stock, lean = make(SFTTrainer), make(lean_sft_trainer())
    assert lean.lean and lean.keep_logits
    batch = stock.data_collator(rows)
    losses, grads = [], []
    for t in (stock, lean):
        t.model.train()
        t.model.zero_grad()
        loss = t.compute_loss(t.model, dict(batch), num_items_in_batch=torch.tensor(10))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    sums = lean.epoch_sums
    assert sums["target_tokens"] == 10 and int(sums["tokens"]) == sum(len(r["input_ids"]) for r in rows)
    assert float(sums["nll_sum"]) == pytest.approx(float(losses[1]) * 10, rel=1e-5)
