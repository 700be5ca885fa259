"""A learned step verifier: P(good step | context, candidate), trained on step-quality labels from rollouts.

Labels (one example per (state, candidate)): a candidate is good iff it equals the oracle's action at that
state (`oracle_action`, re-planned by the teacher from the true state, so it is right after any detour).
Rows without an oracle label count only when their episode succeeded: the action taken is then the positive.
Episode success alone is not used as a step label: a failed episode can contain good steps and vice versa.
Negatives: TextWorld rows give the other admissible actions; envs without an admissible list give the
recorded SLM candidates plus the oracle's actions at the other steps of the same episode (right then,
wrong now: e.g. `submit` before the code is tested).

Features: the env's rule-verifier signals (dense) + hashed words/bigrams of the candidate and crossings with
the goal, the injection-free observation and the last action (an EmbeddingBag, so the hash space can be big).
Model: a small MLP (or logistic regression with hidden_size=0), trained with class-balanced BCE.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r2v.envs.base import Task
from r2v.errors import R2VError
from r2v.policies.base import StepContext
from r2v.experiment import Experiment
from r2v.verifier.base import auroc, context_from_row, sandbox_limits
from r2v.verifier.rules import SIGNALS, rule_verifier, split_injections

if TYPE_CHECKING:
    from r2v.config import R2VConfig

FORMAT = "r2v-verifier@1"
WEIGHTS = "model.pt"
SPEC = "spec.json"


# ---------------------------------------------------------------------------------------- features
def _norm(text: str) -> str:
    return " ".join((text or "").strip().lower().split())


def _tokens(text: str, limit: int = 64) -> list[str]:
    import re

    return re.findall(r"[a-z0-9_]+", text.lower())[:limit]


def _bucket(feature: str, dim: int) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little") % dim


def hashed_features(ctx: StepContext, cand: str, clean_obs: str) -> list[str]:
    """Named sparse features of (context, candidate); names, not indices, so the hash size can change."""
    toks = _tokens(cand)
    verb = toks[0] if toks else "<empty>"
    goal_w, obs_w = set(_tokens(ctx.goal, 400)), set(_tokens(clean_obs, 400))
    last = _tokens(ctx.history[-1][0], 8) if ctx.history else []
    last_verb = last[0] if last else "<start>"
    args = toks[1:]
    feats = [f"v={verb}", f"lv={last_verb}|{verb}", f"st={min(ctx.step, 6)}|{verb}",
             f"vg={verb}|{any(w in goal_w for w in args)}", f"vo={verb}|{any(w in obs_w for w in args)}",
             f"rl={verb}|{_norm(cand) == _norm(ctx.history[-1][0]) if ctx.history else False}"]
    feats += [f"w={w}" for w in toks]
    feats += [f"b={a}_{b}" for a, b in zip(toks, toks[1:])]
    feats += [f"gw={w}" for w in toks if w in goal_w]
    feats += [f"ow={w}" for w in toks if w in obs_w]
    return feats


class Featurizer:
    """(ctx, candidates) -> (dense rule signals, hashed sparse indices) for the model."""

    def __init__(self, env: str, hash_dim: int, tasks: dict[str, Task] | None = None, limits=None):
        if env not in SIGNALS:
            raise R2VError(f"`env.name` = {env!r}: the learned verifier supports {sorted(SIGNALS)}")
        self.env, self.hash_dim = env, hash_dim
        self.signals = SIGNALS[env]
        self.rule = rule_verifier(env, tasks=tasks, limits=limits)

    def __call__(self, ctx: StepContext, candidates: list[str]) -> tuple[list[list[float]], list[list[int]]]:
        sigs = self.rule.signals(ctx, candidates)
        clean, _ = split_injections(ctx.observation.text)
        dense = [[float(s[k]) for k in self.signals] for s in sigs]
        sparse = [sorted({_bucket(f, self.hash_dim) for f in hashed_features(ctx, c, clean)}) for c in candidates]
        return dense, sparse


# ---------------------------------------------------------------------------------------- model
def _device(name: str):
    import torch

    from r2v.config import resolve_device

    return torch.device(resolve_device(name, "verifier.device"))


def _build_model(n_dense: int, hash_dim: int, hidden: int):
    from torch import nn

    class StepScorer(nn.Module):
        def __init__(self):
            super().__init__()
            width = hidden or 1
            self.bag = nn.EmbeddingBag(hash_dim, width, mode="sum")
            self.dense = nn.Linear(n_dense, width)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 1)) if hidden else None
            nn.init.normal_(self.bag.weight, std=0.01)

        def forward(self, dense, idx, offsets, weights):
            z = self.dense(dense) + self.bag(idx, offsets, per_sample_weights=weights)
            return (self.head(z) if self.head is not None else z).squeeze(-1)

    return StepScorer()


def _batch(dense: list[list[float]], sparse: list[list[int]], device):
    """Tensors for the model; each example's sparse features are L2-normalised (count-independent)."""
    import torch

    offsets, idx, weights = [], [], []
    for row in sparse:
        offsets.append(len(idx))
        idx.extend(row)
        weights.extend([1.0 / math.sqrt(len(row))] * len(row) if row else [])
    return (torch.tensor(dense, dtype=torch.float32, device=device),
            torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
            torch.tensor(weights, dtype=torch.float32, device=device))


class LearnedVerifier:
    """The trained scorer plus its featurizer; `score` is a sigmoid, so scores lie in [0, 1]."""

    def __init__(self, model, spec: dict[str, Any], device, tasks: dict[str, Task] | None = None, limits=None):
        self.model, self.spec, self.device = model.to(device).eval(), spec, device
        self.featurizer = Featurizer(spec["env"], spec["hash_dim"], tasks=tasks, limits=limits)
        self.rule = self.featurizer.rule

    def score(self, ctx: StepContext, candidates: list[str]) -> list[float]:
        if not candidates:
            return []
        import torch

        dense, sparse = self.featurizer(ctx, candidates)
        with torch.no_grad():
            logits = self.model(*_batch(dense, sparse, self.device))
        return [float(x) for x in torch.sigmoid(logits).cpu()]

    def save(self, path: str | Path) -> Path:
        import torch

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, path / WEIGHTS)
        (path / SPEC).write_text(json.dumps(self.spec, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, tasks: dict[str, Task] | None = None, device: str = "auto",
             limits=None) -> "LearnedVerifier":
        import torch

        path = Path(path)
        if not (path / SPEC).is_file() or not (path / WEIGHTS).is_file():
            raise R2VError(f"no learned verifier at {path} (needs {SPEC} and {WEIGHTS}): run `r2v train-verifier` "
                           "first, or set verifier.kind=rule")
        try:
            spec = json.loads((path / SPEC).read_text())
        except json.JSONDecodeError as e:
            raise R2VError(f"{path / SPEC}: not valid JSON ({e}); re-run `r2v train-verifier`") from None
        if spec.get("format") != FORMAT:
            raise R2VError(f"{path / SPEC}: format {spec.get('format')!r}, expected {FORMAT!r}; "
                           "re-run `r2v train-verifier`")
        dev = _device(device)
        model = _build_model(len(spec["signals"]), spec["hash_dim"], spec["hidden_size"])
        model.load_state_dict(torch.load(path / WEIGHTS, map_location=dev, weights_only=True))
        return cls(model, spec, dev, tasks=tasks, limits=limits)


# ---------------------------------------------------------------------------------------- data
def _candidate_set(row: dict[str, Any], episode_actions: list[str]) -> tuple[list[str], str] | None:
    """(candidates, the positive) for one step row, or None when the row has no usable label."""
    positive = row.get("oracle_action")
    if not positive:
        if not (row.get("episode_success") and row.get("action")):
            return None
        positive = row["action"]
    admissible = row.get("admissible")
    if admissible is not None and len(admissible):
        cands = [str(a) for a in admissible]
    else:
        recorded = row.get("candidates")
        cands = [str(c["text"]) for c in (recorded if recorded is not None else []) if c.get("text")]
        cands += [row.get("action") or ""] + episode_actions
    cands.append(positive)
    seen, out = set(), []
    for c in cands:
        key = _norm(c)
        if key and key not in seen:
            seen.add(key)
            out.append(c)
    return out, positive


def read_step_rows(cfg: "R2VConfig") -> list[dict[str, Any]]:
    """The step rows the verifier learns from: the products of its upstream stages only, the teacher's
    episodes (collect-teacher) and BC's probes under perturbations (build-pairs). Never the rest of
    rollouts/ (later stages' episodes, `.stale-*` folders made from other inputs): the verifier must not
    depend on what earlier runs left behind."""
    from r2v.data import ShardStore

    exp = Experiment(cfg)
    dirs = [exp.rollouts("teacher"), exp.pair_probes]
    rows: list[dict[str, Any]] = []
    for d in dirs:
        if d.is_dir():
            rows.extend(ShardStore(d, "steps").read_pandas().to_dict("records"))
    if not rows:
        raise R2VError(f"no step shards under {dirs[0]} or {dirs[1]}: run `r2v collect-teacher` first")
    return rows


def build_examples(rows: list[dict[str, Any]], max_steps: int, tasks: dict[str, Task] | None = None
                   ) -> list[tuple[StepContext, list[str], list[int]]]:
    """(context, candidates, labels) per labelled state; see the module docstring for the labels."""
    by_episode: dict[str, list[str]] = {}
    for r in rows:
        a = r.get("oracle_action") or (r.get("action") if r.get("episode_success") else None)
        if a:
            by_episode.setdefault(str(r.get("episode_id")), []).append(a)
    out = []
    for r in rows:
        got = _candidate_set(r, by_episode.get(str(r.get("episode_id")), []))
        if got is None:
            continue
        cands, positive = got
        labels = [int(_norm(c) == _norm(positive)) for c in cands]
        if len(cands) < 2:
            continue
        task = (tasks or {}).get(str(r.get("task_id")))
        out.append((context_from_row(r, max_steps, task), cands, labels))
    return out


def _featurize(examples, featurizer: Featurizer):
    dense, sparse, labels = [], [], []
    for ctx, cands, ys in examples:
        d, s = featurizer(ctx, cands)
        dense += d
        sparse += s
        labels += ys
    return dense, sparse, labels


# ---------------------------------------------------------------------------------------- training
def train_verifier(examples, cfg: "R2VConfig", tasks: dict[str, Task] | None = None) -> LearnedVerifier:
    import torch

    vc = cfg.verifier
    featurizer = Featurizer(cfg.env.name, vc.hash_dim, tasks=tasks, limits=sandbox_limits(cfg))
    dense, sparse, labels = _featurize(examples, featurizer)
    n_pos = sum(labels)
    if n_pos == 0 or n_pos == len(labels):
        raise R2VError("the training rows give only one class of step labels (need both good and bad candidates): "
                       "collect rollouts with `oracle_action` labels and admissible lists or SLM candidates")
    device = _device(vc.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = _build_model(len(featurizer.signals), vc.hash_dim, vc.hidden_size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=vc.learning_rate, weight_decay=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(labels) - n_pos) / n_pos, device=device))
    order = list(range(len(labels)))
    bs = max(1, vc.batch_size)
    steps_per_epoch = math.ceil(len(order) / bs)
    total = max(vc.epochs * steps_per_epoch, vc.min_steps)
    model.train()
    step = 0
    while step < total:
        rng.shuffle(order)
        for i in range(0, len(order), bs):
            b = order[i : i + bs]
            logits = model(*_batch([dense[j] for j in b], [sparse[j] for j in b], device))
            loss = loss_fn(logits, torch.tensor([float(labels[j]) for j in b], device=device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= total:
                break
    spec = {"format": FORMAT, "env": cfg.env.name, "hash_dim": vc.hash_dim, "hidden_size": vc.hidden_size,
            "signals": list(featurizer.signals), "label": "candidate == oracle_action",
            "train_examples": len(labels), "train_positives": n_pos, "optimizer_steps": total,
            "final_loss": float(loss.item())}
    return LearnedVerifier(model.cpu(), spec, device, tasks=tasks, limits=sandbox_limits(cfg))


def score_examples(verifier, examples) -> tuple[list[int], list[float]]:
    ys, ss = [], []
    for ctx, cands, labels in examples:
        ys += labels
        ss += verifier.score(ctx, cands)
    return ys, ss


def _top1(verifier, examples) -> float | None:
    """Share of states where the verifier's best candidate is the oracle's (ties broken by list order)."""
    if not examples:
        return None
    hits = 0
    for ctx, cands, labels in examples:
        s = verifier.score(ctx, cands)
        hits += labels[max(range(len(s)), key=s.__getitem__)]
    return hits / len(examples)


def _tasks_for(cfg: "R2VConfig") -> dict[str, Task] | None:
    """Problem payloads (tests) for the code verifier; other envs read everything from the context."""
    if cfg.env.name != "code":
        return None
    from r2v.envs.registry import load_tasks

    return {t.task_id: t for t in load_tasks(cfg.env)}


def evaluate_verifiers(cfg: "R2VConfig", split: str = "val", learned: LearnedVerifier | None = None,
                       rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Held-out AUROC / top-1 of the rule verifier and (when trained) the learned one on `split` rows;
    label: candidate == oracle action. Reused by the report."""
    tasks = _tasks_for(cfg)
    rows = rows if rows is not None else read_step_rows(cfg)
    examples = build_examples([r for r in rows if r.get("split") == split], cfg.env.max_steps, tasks)
    saved = Experiment(cfg).model("verifier")
    if learned is None and (saved / SPEC).is_file():
        learned = LearnedVerifier.load(saved, tasks=tasks, device=cfg.verifier.device,
                                       limits=sandbox_limits(cfg))
    out: dict[str, Any] = {"split": split, "eval_states": len(examples),
                           "eval_candidates": sum(len(c) for _, c, _ in examples)}
    rule = rule_verifier(cfg.env.name, tasks=tasks, limits=sandbox_limits(cfg))
    for name, v in (("rule", rule), ("learned", learned)):
        if v is None:
            continue
        ys, ss = score_examples(v, examples)
        out[f"{name}_auroc"] = auroc(ys, ss)
        out[f"{name}_top1"] = _top1(v, examples)
    return out


def run_train_verifier(cfg: "R2VConfig") -> dict[str, Any]:
    """Stage `train-verifier`: teacher and pair-probe train rows -> models/verifier/ (model.pt + spec.json);
    the summary holds held-out (val) AUROC of the rule and learned verifiers and the counts."""
    tasks = _tasks_for(cfg)
    rows = read_step_rows(cfg)
    train = build_examples([r for r in rows if r.get("split") == "train"], cfg.env.max_steps, tasks)
    if not train:
        raise R2VError(f"no labelled train-split step rows under {Experiment(cfg).rollouts_dir}: collect "
                       "rollouts on the train split (rows need `oracle_action`) first")
    verifier = train_verifier(train, cfg, tasks)
    metrics = evaluate_verifiers(cfg, "val", learned=verifier, rows=rows)
    verifier.spec.update(metrics={k: v for k, v in metrics.items()})
    out_dir = verifier.save(Experiment(cfg).model("verifier"))
    return {"verifier_dir": str(out_dir), "train_rows": sum(r.get("split") == "train" for r in rows),
            "train_states": len(train), "train_examples": verifier.spec["train_examples"],
            "train_positives": verifier.spec["train_positives"], **metrics}


__all__ = ["LearnedVerifier", "Featurizer", "train_verifier", "build_examples", "read_step_rows",
           "evaluate_verifiers", "run_train_verifier", "score_examples"]
