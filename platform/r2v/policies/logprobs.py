"""Log-probs of chosen tokens in bounded memory: the one place every scorer and loss computes them.

A naive `log_softmax(logits.float())` materialises [rows, T, V] in fp32: with a 151,936-token vocabulary,
2k tokens and 64 rows that is ~78 GB. Here the log-softmax is taken chunk by chunk over the flattened
positions (logsumexp of the chunk in fp32, minus the chosen logit), so at most one chunk of `CHUNK_BYTES`
is ever upcast, and:

* `selective_logps(logits, targets)` works from logits the model already returned (training: the logits
  are in the model dtype; no fp32 copy of them is made, and the backward pass recomputes the softmax per
  chunk instead of keeping it).
* `hidden_logps(hidden, head, targets)` works from the final hidden states and the output head, so even
  the logits exist one chunk at a time (scoring; in training each chunk is checkpointed, its logits
  recomputed in the backward pass).
* `row_logps(logits, rows, targets)` scores many targets against a few shared rows of logits.
* `model_hidden(model, ...)` runs a causal LM's decoder without its head (falls back to logits).
"""
from __future__ import annotations

CHUNK_BYTES = 64 * 2**20  # fp32 bytes of one logits chunk: ~110 positions at V = 152k


def _chunk_rows(vocab: int, chunk_bytes: int | None) -> int:
    return max(1, int(chunk_bytes or CHUNK_BYTES) // (4 * max(1, vocab)))


def _make_selective():
    import torch

    class _Selective(torch.autograd.Function):
        """log_softmax(x)[t] over rows of x [N, V]; saves x (already alive) and the fp32 logsumexp only."""

        @staticmethod
        def forward(ctx, x, t, rows):
            out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
            lse = torch.empty_like(out)
            for i in range(0, x.shape[0], rows):
                chunk = x[i : i + rows].float()
                lse[i : i + rows] = torch.logsumexp(chunk, dim=-1)
                out[i : i + rows] = chunk.gather(-1, t[i : i + rows, None]).squeeze(-1) - lse[i : i + rows]
            ctx.save_for_backward(x, t, lse)
            ctx.rows = rows
            return out

        @staticmethod
        def backward(ctx, grad):
            x, t, lse = ctx.saved_tensors
            gx = torch.empty_like(x)
            for i in range(0, x.shape[0], ctx.rows):
                g = grad[i : i + ctx.rows, None].float()
                soft = torch.exp(x[i : i + ctx.rows].float() - lse[i : i + ctx.rows, None])
                d = -soft * g  # d/dx of (x[t] - lse) = onehot(t) - softmax
                d.scatter_add_(-1, t[i : i + ctx.rows, None], g)
                gx[i : i + ctx.rows] = d.to(x.dtype)
            return gx, None, None

    return _Selective


_SELECTIVE = None


def selective_logps(logits, targets, chunk_bytes: int | None = None):
    """log p(targets) under softmax(logits), fp32, shape of `targets`; `logits` is [..., V] in any dtype.
    Exact (same math as log_softmax + gather) with gradients; extra memory is one fp32 chunk."""
    global _SELECTIVE
    if _SELECTIVE is None:
        _SELECTIVE = _make_selective()
    shape = targets.shape
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = _SELECTIVE.apply(flat, targets.reshape(-1).long(), _chunk_rows(vocab, chunk_bytes))
    return out.reshape(shape)


def hidden_logps(hidden, head, targets, chunk_bytes: int | None = None):
    """log p(targets) from final hidden states [..., H] and the output head (a module H -> V): logits exist
    one chunk of positions at a time. Under autograd each chunk is checkpointed (its logits are recomputed
    in the backward pass), so training memory stays bounded too."""
    import torch
    from torch.utils.checkpoint import checkpoint

    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    vocab = _head_vocab(head)
    rows = _chunk_rows(vocab, chunk_bytes)

    def piece(hc, tc):
        return selective_logps(head(hc), tc, chunk_bytes)

    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = [checkpoint(piece, h[i : i + rows], t[i : i + rows], use_reentrant=False) if grad
             else piece(h[i : i + rows], t[i : i + rows]) for i in range(0, h.shape[0], rows)]
    out = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return out.reshape(shape)


def row_logps(logits, rows, targets, chunk_bytes: int | None = None):
    """log p(targets[i]) under softmax(logits[rows[i]]): many targets against few rows of logits (every
    action's first token after its prompt) without repeating rows; the fp32 logsumexp is taken one chunk
    of rows at a time. Scoring only (no custom backward)."""
    import torch

    n = _chunk_rows(logits.shape[-1], chunk_bytes)
    lse = torch.cat([torch.logsumexp(logits[i : i + n].float(), dim=-1) for i in range(0, logits.shape[0], n)])
    return logits[rows, targets].float() - lse[rows]


def _head_vocab(head) -> int:
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel() > 0:
        return int(weight.shape[0])
    return int(getattr(head, "out_features", 0) or 150_000)  # ZeRO-3 partitioned: assume a large vocabulary


def decoder_and_head(model):
    """(decoder, output head) of an HF causal LM (also through a PEFT wrapper), or None when the model
    does not expose them; the decoder returns `last_hidden_state` (after the final norm)."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def completion_logps(model, input_ids, attention_mask, target_pos, target_ids):
    """log p of `target_ids` at positions `target_pos` = (rows, cols) of the *inputs* whose output predicts
    them (i.e. the token before each target), without computing logits anywhere else. Used by scoring."""
    parts = decoder_and_head(model)
    if parts is None:  # an architecture without get_decoder: full logits, still no fp32 [rows, T, V]
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return selective_logps(logits[target_pos], target_ids)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden_logps(hidden[target_pos], head, target_ids)


__all__ = ["selective_logps", "hidden_logps", "row_logps", "completion_logps", "decoder_and_head", "CHUNK_BYTES"]
