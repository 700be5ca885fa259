"""Chosen-token log-probs in bounded memory (r2v.policies.logprobs): equal to the naive log-softmax, with
equal gradients, and a peak memory that does not grow with rows × T × V."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from r2v.policies.logprobs import hidden_logps, selective_logps  # noqa: E402
from r2v.train.common import sequence_logps, token_logps  # noqa: E402

V_REAL = 151_936


def naive(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_equals_naive_with_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(3, 7, 501, generator=g)).to(dtype)
    targets = torch.randint(0, 501, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    got = selective_logps(a, targets, chunk_bytes=4 * 501 * 2)  # 2 rows per chunk: many chunks
    want = naive(b, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


def test_hidden_logps_equals_naive_with_gradient():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 9, 16, generator=g)
    targets = torch.randint(0, 300, (2, 9), generator=g)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = hidden_logps(h1, head, targets, chunk_bytes=4 * 300 * 5)
    got.sum().backward()
    w_grad = head.weight.grad.clone()
    head.weight.grad = None
    want = naive(head(h2), targets)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_grad, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_token_and_sequence_logps_shift_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 40, generator=g)
    ids = torch.randint(0, 40, (2, 6), generator=g)
    want = naive(logits[:, :-1], ids[:, 1:])
    torch.testing.assert_close(token_logps(logits, ids), want)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    torch.testing.assert_close(sequence_logps(logits, {"input_ids": ids, "loss_mask": mask}), want[:, 3:].sum(-1))


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from r2v.policies.logprobs import hidden_logps, selective_logps

    def hwm():  # peak resident set (kB) since the last reset
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    def reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    kind, rows, T, V, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    targets = torch.randint(0, V, (rows, T))
    if kind == "hidden":
        head = torch.nn.Linear(H, V, bias=False)
        hidden = torch.randn(rows, T, H, requires_grad=True)
        inputs = hidden.numel() * 4 + head.weight.numel() * 4
        reset(); base = hwm()
        out = hidden_logps(hidden, head, targets)
        out.sum().backward()
    else:
        logits = torch.randn(rows, T, V, dtype=torch.bfloat16, requires_grad=True)
        inputs = logits.numel() * 2
        reset(); base = hwm()
        out = selective_logps(logits, targets)  # forward only: the gradient's size is autograd's business
    assert torch.isfinite(out).all()
    print(json.dumps({"extra": hwm() - base, "inputs": inputs}))
""")


def _peak(kind: str, rows: int, T: int, V: int, H: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, str(rows), str(T), str(V), str(H)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_bounded_at_real_vocabulary():
    """16 rows × T = 1,024 × V = 151,936, forward and backward, from hidden states (H = 64).

    Naively the fp32 logits alone are 16·1024·151,936·4 B ≈ 9.96 GB and the log-softmax another 9.96 GB.
    Chunked, at most a few chunks of CHUNK_BYTES (64 MiB) of fp32 logits/softmax/gradient are alive at once,
    plus O(rows·T) vectors and the head's weight gradient (39 MB): the bound is 600 MB, < 3 % of naive.
    Measured as the growth of the process's peak RSS (VmHWM, reset via /proc/self/clear_refs) in a fresh
    subprocess; RSS counts everything torch's CPU allocator touches, which tracemalloc does not see."""
    got = _peak("hidden", 16, 1024, V_REAL, 64)
    naive_bytes = 2 * 16 * 1024 * V_REAL * 4
    assert got["extra"] < 600 * 2**20, got
    assert got["extra"] < 0.03 * naive_bytes


@pytest.mark.slow
def test_peak_memory_from_logits_adds_no_fp32_copy():
    """Forward from bf16 logits [16, 64, 151,936] (311 MB) that require grad, as in training: the naive
    path adds an fp32 copy and an fp32 log-softmax (622 MB each, both kept for backward); chunked, only a
    chunk or two of fp32 (CHUNK_BYTES = 64 MiB) is alive at once, and backward recomputes the softmax per
    chunk: bound 192 MB, < 1/6 of naive."""
    got = _peak("logits", 16, 64, V_REAL, 0)
    assert got["extra"] < 192 * 2**20, got
