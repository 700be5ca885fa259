"""The SLM policy: any Hugging Face causal-LM directory, batched over many env states at once.

Two modes (`policy.mode`):
- `rank`: score every admissible action by its summed token log-prob and act greedily; the policy's
  distribution over actions is the softmax of those scores (its entropy is the step's entropy). On
  TextWorld this beats free generation by far for a small model (PITFALLS.md).
- `generate`: sample K candidates (temperature/top-p), re-score each, keep distinct ones; entropy is
  the first-token entropy.
Every decision carries its K best candidates with summed and mean log-probs: the verifier and the router
read them.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from r2v.config import ModelConfig, PolicyConfig, R2VConfig, resolve_device
from r2v.envs.base import Env
from r2v.errors import R2VError
from r2v.experiment import is_model_dir
from r2v.policies.base import Candidate, Decision, StepContext
from r2v.policies.prompts import (completion, encode_pair, encode_pairs, encode_prompt, parse_action, prompt_chars,
                                  render_prompt)


def resolve_dtype(spec: str, device):
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return getattr(torch, spec)
    except AttributeError:
        raise R2VError(f"`model.dtype` = {spec!r} is not a torch dtype (float32, bfloat16, float16)") from None


def load_slm(path: str | Path, model_cfg: ModelConfig, device=None):
    """(model, tokenizer) from an HF directory; a LoRA adapter directory is loaded on top of its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_model_dir(path):
        raise R2VError(f"{path} is not a Hugging Face model directory (no config.json / adapter_config.json); "
                       "run the stage that writes it (init-model, train-bc, train-dpo) or fix `model.path`")
    device = device or torch.device(resolve_device(model_cfg.device, "model.device"))
    dtype = resolve_dtype(model_cfg.dtype, device)
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device).eval()
    return model, tokenizer


class SLMPolicy:
    def __init__(self, path: str | Path, model_cfg: ModelConfig, policy_cfg: PolicyConfig, device=None):
        self.path = str(path)
        self.model_cfg = model_cfg
        self.cfg = policy_cfg
        self.model, self.tokenizer = load_slm(path, model_cfg, device)
        self.device = next(self.model.parameters()).device
        self.max_tokens = model_cfg.max_context_tokens

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, prompts: list[str], completions: list[str]) -> list[tuple[float, float]]:
        """(summed, mean) log-prob of each completion (+eos) after its prompt: every (prompt, completion)
        encoded in full, right-padded in length-sorted batches of <= BATCH_TOKENS (the reference for
        `score_actions`)."""
        import torch

        from r2v.policies.logprobs import completion_logps

        encoded = [encode_pair(self.tokenizer, p, c, self.max_tokens) for p, c in zip(prompts, completions)]
        out: dict[int, tuple[float, float]] = {}
        pad = self.tokenizer.pad_token_id
        for group in length_buckets([len(ids) for ids, _ in encoded], [1] * len(encoded)):
            chunk = [encoded[i] for i in group]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, cols, targets = [], [], []
            for j, (seq, n_prompt) in enumerate(chunk):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
                rows += [j] * (len(seq) - n_prompt)
                cols += range(n_prompt - 1, len(seq) - 1)  # the output at position t predicts token t + 1
                targets += seq[n_prompt:]
            with torch.no_grad():
                lp = completion_logps(self.model, ids.to(self.device), mask.to(self.device),
                                      (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)),
                                      torch.tensor(targets, device=self.device)).cpu()
            start = 0
            for i, (seq, n_prompt) in zip(group, chunk):
                part = lp[start : start + len(seq) - n_prompt]
                start += len(seq) - n_prompt
                out[i] = (float(part.sum()), float(part.mean()))
        return [out[i] for i in range(len(encoded))]

    def score_actions(self, prompt: str, completions: list[str]) -> list[tuple[float, float]]:
        """`score` for many completions of one prompt, sharing its prefix (see `score_actions_many`)."""
        return self.score_actions_many([prompt], [completions])[0]

    def score_actions_many(self, prompts: list[str], completions: list[list[str]]) -> list[list[tuple[float, float]]]:
        """`score` for the completions of many prompts, each prompt encoded once: prompts are bucketed by token
        length, every bucket's prompts go through one right-padded forward, then all their completions
        continue from the prompts' KV caches in one batch (rank mode scores every admissible action of every
        state of a batch this way). Completions whose prompt tokens differ (cut differently to fit the
        context) go through `score`."""
        from r2v.policies.logprobs import decoder_and_head

        parts = decoder_and_head(self.model)
        out: list[dict[int, tuple[float, float]]] = [{} for _ in prompts]
        full: list[tuple[int, int]] = []  # (prompt, completion) scored by full encoding
        shared: list[tuple[int, list[int], list[int], list[list[int]]]] = []  # (prompt, prefix, which, conts)
        for i, (prompt, comps) in enumerate(zip(prompts, completions)):
            if not comps:
                continue
            encoded = encode_pairs(self.tokenizer, prompt, comps, self.max_tokens)
            if parts is None:
                full += [(i, j) for j in range(len(comps))]
                continue
            prefix = encoded[0][0][: encoded[0][1]]
            which = [j for j, (ids, n) in enumerate(encoded) if ids[:n] == prefix]
            full += [(i, j) for j in sorted(set(range(len(comps))) - set(which))]
            shared.append((i, prefix, which, [encoded[j][0][len(prefix):] for j in which]))
        if full:
            scores = self.score([prompts[i] for i, _ in full], [completions[i][j] for i, j in full])
            for (i, j), s in zip(full, scores):
                out[i][j] = s
        sizes = [len(prefix) + max(len(c) for c in conts) for _, prefix, _, conts in shared]
        for group in length_buckets(sizes, [len(conts) for *_, conts in shared]):
            items = [shared[g] for g in group]
            scores = self._continue([(prefix, conts) for _, prefix, _, conts in items], *parts)
            for (i, _, which, _), s in zip(items, scores):
                out[i].update(zip(which, s))
        return [[o[j] for j in range(len(c))] for o, c in zip(out, completions)]

    def _continue(self, items: list[tuple[list[int], list[list[int]]]], decoder,
                  head) -> list[list[tuple[float, float]]]:
        """(summed, mean) log-prob of each continuation (>= 1 token each) after its prefix, for many
        (prefix, continuations) items: one forward of the right-padded prefixes, then every continuation
        of every item, right-padded, in one batch over its prefix's cache row. Position ids continue each
        prefix from its own length and the mask hides the pads, so values equal one-by-one scoring."""
        import torch

        from r2v.policies.logprobs import hidden_logps, row_logps

        dev, pad = self.device, self.tokenizer.pad_token_id
        lens = torch.tensor([len(p) for p, _ in items])
        width_p = int(lens.max())
        ids = torch.full((len(items), width_p), pad, dtype=torch.long)
        for i, (p, _) in enumerate(items):
            ids[i, : len(p)] = torch.tensor(p)
        mask = (torch.arange(width_p)[None, :] < lens[:, None]).long()
        owner = torch.tensor([i for i, (_, conts) in enumerate(items) for _ in conts])
        conts = [c for _, cs in items for c in cs]
        with torch.no_grad():
            res = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
            last = head(res.last_hidden_state[torch.arange(len(items), device=dev), (lens - 1).to(dev)])
            # each prefix's last output predicts the first token of all of its continuations
            firsts = torch.tensor([c[0] for c in conts], device=dev)
            lps = [[x] for x in row_logps(last, owner.to(dev), firsts).tolist()]
            width = max(len(c) for c in conts) - 1
            if width > 0:
                cont_ids = torch.full((len(conts), width), pad, dtype=torch.long)
                cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
                rows, cols, targets = [], [], []
                for k, c in enumerate(conts):
                    cont_ids[k, : len(c) - 1] = torch.tensor(c[:-1])
                    cont_mask[k, : len(c) - 1] = 1
                    rows += [k] * (len(c) - 1)
                    cols += range(len(c) - 1)  # the output at position t predicts token t + 1
                    targets += c[1:]
                cache = res.cache
                cache.batch_select_indices(owner.to(dev))  # one cache row per continuation
                hidden = decoder(input_ids=cont_ids.to(dev),
                                 attention_mask=torch.cat([mask[owner], cont_mask], 1).to(dev),
                                 position_ids=(lens[owner][:, None] + torch.arange(width)[None, :]).to(dev),
                                 cache=cache, use_cache=True).last_hidden_state
                at = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
                for k, x in zip(rows, hidden_logps(hidden[at], head, torch.tensor(targets, device=dev)).tolist()):
                    lps[k].append(x)
        scores = [(sum(x), sum(x) / len(x)) for x in lps]
        per, start = [], 0
        for _, cs in items:
            per.append(scores[start : start + len(cs)])
            start += len(cs)
        return per

    # -- acting ---------------------------------------------------------------------------------------
    def act(self, ctxs: list[StepContext]) -> list[Decision]:
        if self.cfg.batch_invariant and len(ctxs) > 1:  # one forward per state: its scores never see its company
            return [d for ctx in ctxs for d in self.act([ctx])]
        ranked = [i for i, c in enumerate(ctxs) if self.cfg.mode == "rank" and c.observation.admissible]
        generated = [i for i in range(len(ctxs)) if i not in set(ranked)]
        decisions: dict[int, Decision] = {}
        if ranked:
            decisions.update(zip(ranked, self.rank([ctxs[i] for i in ranked])))
        if generated:
            decisions.update(zip(generated, self.generate([ctxs[i] for i in generated])))
        return [decisions[i] for i in range(len(ctxs))]

    def prompt(self, ctx: StepContext) -> str:
        return render_prompt(ctx, self.cfg.history_steps, **prompt_chars(self.cfg))

    def rank(self, ctxs: list[StepContext]) -> list[Decision]:
        actions = [list(ctx.observation.admissible) for ctx in ctxs]
        scores = self.score_actions_many([self.prompt(ctx) for ctx in ctxs],
                                         [[completion(a) for a in acts] for acts in actions])
        per = [[Candidate(a, s, m) for a, (s, m) in zip(acts, sc)] for acts, sc in zip(actions, scores)]
        decisions = []
        for ctx, cands in zip(ctxs, per):
            cands.sort(key=lambda c: c.logprob, reverse=True)
            top = cands[: self.cfg.num_candidates]
            if self.cfg.rank_temperature > 0:  # sample among the top K, seeded by the state: replays repeat it
                top.insert(0, top.pop(self._sample(ctx, [c.logprob for c in top])))
            decisions.append(Decision(action=top[0].text, actor="slm", candidates=top,
                                      entropy=_entropy([c.logprob for c in cands])))
        return decisions

    def _sample(self, ctx: StepContext, logprobs: list[float]) -> int:
        import random

        from r2v.envs.base import stable_seed

        rng = random.Random(stable_seed("rank-sample", ctx.task.task_id, ctx.seed, ctx.step,
                                        *[a for a, _ in ctx.history]))
        m = max(logprobs)
        weights = [math.exp((x - m) / self.cfg.rank_temperature) for x in logprobs]
        return rng.choices(range(len(logprobs)), weights=weights)[0]

    def generate(self, ctxs: list[StepContext]) -> list[Decision]:
        import torch

        k = self.cfg.num_candidates if self.cfg.temperature > 0 else 1  # greedy: K copies of one sequence
        prompts = [self.prompt(c) for c in ctxs]
        budget = max(8, self.max_tokens - self.cfg.max_new_tokens)
        enc = [encode_prompt(self.tokenizer, p, budget) for p in prompts]
        width = max(len(e) for e in enc)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=self.device)
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(e) for e in enc])[:, None]).long()
        sampling = (dict(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p)
                    if self.cfg.temperature > 0 else dict(do_sample=False))  # temperature 0: greedy
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask.to(self.device), **sampling, max_new_tokens=self.cfg.max_new_tokens,
                num_return_sequences=k, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        first = torch.log_softmax(out.logits[0].float(), dim=-1)  # raw (B*k, V); rows of one prompt are equal
        texts = self.tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
        per = []
        for i in range(len(ctxs)):
            actions = list(dict.fromkeys(a for a in (parse_action(t) for t in texts[i * k : (i + 1) * k]) if a))
            per.append(actions or [""])  # nothing parseable: an empty action, the episode ends as the SLM's failure
        all_scores = self.score_actions_many(prompts, [[completion(a) for a in acts] for acts in per])
        decisions = []
        for i, (actions, scores) in enumerate(zip(per, all_scores)):
            cands = sorted((Candidate(a, s, m) for a, (s, m) in zip(actions, scores)),
                           key=lambda c: c.logprob, reverse=True)
            ent = float(-(first[i * k].exp() * first[i * k]).sum())
            decisions.append(Decision(action=cands[0].text, actor="slm", candidates=cands, entropy=ent))
        return decisions


BATCH_TOKENS = 16384  # padded tokens per scoring forward (prefix rows + every continuation's copy of its cache)


def length_buckets(lengths: list[int], rows: list[int], budget: int | None = None) -> list[list[int]]:
    """Indices of items grouped for padded batches: sorted by token length so a batch's rows are of similar
    length (little padding), each group's padded size (its rows x its longest length) within `budget`
    tokens; an item over budget goes alone."""
    budget = budget or BATCH_TOKENS
    groups: list[list[int]] = []
    cur: list[int] = []
    n = longest = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if cur and (n + rows[i]) * max(longest, lengths[i]) > budget:
            groups.append(cur)
            cur, n, longest = [], 0, 0
        cur.append(i)
        n, longest = n + rows[i], max(longest, lengths[i])
    return groups + [cur] if cur else groups


def _entropy(logits: list[float]) -> float:
    m = max(logits)
    ps = [math.exp(x - m) for x in logits]
    z = sum(ps)
    return float(-sum(p / z * math.log(p / z) for p in ps if p > 0))


class SLMAgent:
    """The SLM acting alone (the `slm` rollout policy and the `slm_only` baseline)."""

    name = "slm"

    def __init__(self, policy):
        self.policy = policy  # an SLMPolicy, or a handle with the same `act` (see SLMServer)

    def decide(self, ctx: StepContext, env: Env) -> Decision:
        return self.policy.act([ctx])[0]


class SLMBatcher:
    """Continuous batching over one SLMPolicy: callers' states queue up, and one model thread takes everything
    queued (up to `max_batch`, after waiting at most `max_wait_s` for company) each time it is free, so the next
    batch grows while the current one computes. (Serve's `@serve.batch` closes a batch after its wait and only
    then queues it for the model, which under load leaves batches of one.)"""

    def __init__(self, policy: SLMPolicy, max_batch: int = 32, max_wait_s: float = 0.005):
        self.policy, self.max_batch, self.max_wait_s = policy, max_batch, max_wait_s
        self._cv = threading.Condition()
        self._queue: list[tuple[StepContext, Future]] = []
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many batches
        threading.Thread(target=self._loop, daemon=True, name="slm-batcher").start()

    def submit(self, ctxs: list[StepContext]) -> list[Future]:
        """One future per state (await them with `asyncio.wrap_future`, or `.result()`)."""
        futures = [Future() for _ in ctxs]
        with self._cv:
            self._queue.extend(zip(ctxs, futures))
            self._cv.notify()
        return futures

    def act(self, ctxs: list[StepContext]) -> list[Decision]:
        return [f.result() for f in self.submit(ctxs)]

    def _loop(self) -> None:
        import time

        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.max_batch and time.monotonic() < deadline:
                    self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            batch = [(c, f) for c, f in batch if f.set_running_or_notify_cancel()]  # drop callers that left
            if not batch:
                continue
            self.batch_sizes[len(batch)] += 1
            try:
                decisions = self.policy.act([c for c, _ in batch])
            except Exception as e:  # every waiting caller gets the error, none hangs
                for _, f in batch:
                    f.set_exception(e)
                continue
            for (_, f), d in zip(batch, decisions):
                f.set_result(d)


class SLMServer:
    """One model on the GPU (`collection_slm`) serving every env worker of a collection: calls from many workers
    are batched by an SLMBatcher. Run as a threaded Ray actor (`max_concurrency` >= the number of workers)."""

    def __init__(self, path: str, model_cfg: ModelConfig, policy_cfg: PolicyConfig,
                 max_batch: int = 32, max_wait_s: float = 0.005):
        self.batcher = SLMBatcher(SLMPolicy(path, model_cfg, policy_cfg), max_batch, max_wait_s)

    def act(self, ctxs: list[StepContext]) -> list[Decision]:
        return self.batcher.act(ctxs)

    def batch_sizes(self) -> dict[int, int]:
        return dict(self.batcher.batch_sizes)


class RemoteSLM:
    """A picklable handle to an SLMServer actor with SLMPolicy's `act` signature."""

    def __init__(self, actor):
        self.actor = actor

    def act(self, ctxs: list[StepContext]) -> list[Decision]:
        import ray

        return ray.get(self.actor.act.remote(ctxs))


def slm_in_worker(server, path: str, cfg: R2VConfig) -> "RemoteSLM | SLMPolicy":
    """What an env worker acts with: the collection's shared server (`collection_slm`), or its own copy."""
    return RemoteSLM(server) if server is not None else SLMPolicy(path, cfg.model, cfg.policy)


class SLMAgentFactory:
    """Builds an SLMAgent inside an env worker: over a shared SLMServer when given one, else a local copy."""

    def __init__(self, path: str, server=None):
        self.path, self.server = path, server

    def __call__(self, cfg: R2VConfig) -> SLMAgent:
        return SLMAgent(slm_in_worker(self.server, self.path, cfg))


def _cluster_gpu(cfg: R2VConfig) -> bool:
    """Whether the SLM goes on a GPU: the cluster has one and `model.device` allows it (the cluster's, not ours)."""
    import ray

    wants_gpu = cfg.model.device == "auto" or cfg.model.device.startswith("cuda")
    return ray.cluster_resources().get("GPU", 0) > 0 and wants_gpu


def start_slm_server(cfg: R2VConfig, path: str, num_workers: int):
    """The SLM actor for a collection: on a GPU when the cluster has one, else on CPU."""
    import ray

    use_gpu = _cluster_gpu(cfg)
    # On CPU the server reserves no CPU: it computes while the env workers wait on it, so reserving a
    # core would only leave an env worker unscheduled.
    return ray.remote(SLMServer).options(
        num_gpus=1 if use_gpu else 0, num_cpus=0,
        max_concurrency=max(4, 2 * num_workers), max_restarts=cfg.collect.max_restarts,
    ).remote(path, cfg.model, cfg.policy)


@contextmanager
def collection_slm(cfg: R2VConfig, path: str):
    """The SLM of one collection (`ray.slm_server`), for its agent factories: a shared `SLMServer` actor, killed
    on exit, or None, and each env worker loads its own copy (`slm_in_worker`). "auto" shares one actor when the
    model goes on a GPU (one copy batches every worker's states) and gives each worker its copy on CPU: there a
    step's forward pass is cheaper than the hop to the actor, and copies compute in parallel on the workers'
    cores (1.55x the steps/s of the quickstart's routed episodes; under `policy.batch_invariant` every score is the
    same to the bit)."""
    import ray

    mode = cfg.ray.slm_server
    if mode == "per_worker" or (mode == "auto" and not _cluster_gpu(cfg)):
        yield None
        return
    server = start_slm_server(cfg, path, cfg.collect.num_workers)
    try:
        yield server
    finally:
        ray.kill(server)


class HFTeacher:
    """A local HF model as the teacher (greedy), behind the Teacher interface."""

    kind = "hf"

    def __init__(self, cfg: R2VConfig):
        if not cfg.teacher.model:
            raise R2VError("teacher.kind=hf needs `teacher.model` = a local HF model directory")
        self.policy = SLMPolicy(cfg.teacher.model, cfg.model, cfg.policy)

    def act(self, ctx: StepContext, env: Env):
        import time

        from r2v.policies.teachers import TeacherReply

        t0 = time.perf_counter()
        d = self.policy.act([ctx])[0]
        return TeacherReply(d.action, 0, (time.perf_counter() - t0) * 1e3)
