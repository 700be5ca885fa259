"""Procedural task families (r2v.envs.families): every template yields valid instances in its benchmark's
format whose reference passes the hidden tests while a trivial answer fails, instances differ across seeds,
and the split is by instance and deterministic. Sandbox checks skip without bubblewrap."""
from __future__ import annotations

from pathlib import Path

import pytest

from r2v.config import EnvConfig, load_config
from r2v.envs.families import code as code_families, terminal as terminal_families
from r2v.envs.registry import task_splits
from r2v.errors import ConfigError
from r2v.sandbox import sandbox_available

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap sandbox unavailable "
                                   "(apt-get install bubblewrap)")


def _cfg(name: str, tmp_path: Path | None = None, instances: int = 2, seed: int = 0) -> EnvConfig:
    cfg = EnvConfig(name=name, max_steps=8)
    sub = getattr(cfg, name)
    sub.procedural.enabled, sub.procedural.instances, sub.procedural.seed = True, instances, seed
    if tmp_path is not None:
        cfg.terminal.generated_dir = str(tmp_path)
    cfg.sandbox.wall_seconds = 10.0
    return cfg


def _play(env, task, actions=None):
    env.reset(task)
    res = None
    if actions is None:
        while (action := env.oracle_action()) is not None:
            res = env.step(action)
        return res
    for action in actions:
        res = env.step(action)
    return res


# ----------------------------------------------------------------------------------------- generation
def test_at_least_ten_templates_each():
    assert len(code_families.TEMPLATES) >= 10 and len(terminal_families.TEMPLATES) >= 10


def test_code_rows_are_humaneval_and_differ_across_seeds():
    a, b = code_families.generate(0, 3), code_families.generate(1, 3)
    assert code_families.generate(0, 3) == a  # deterministic
    assert len(a) == 3 * len(code_families.TEMPLATES)
    for row_a, row_b in zip(a, b):
        assert row_a["task_id"] == row_b["task_id"] and row_a["prompt"] != row_b["prompt"]
        assert f"def {row_a['entry_point']}(" in row_a["prompt"] and ">>> " in row_a["prompt"]
        assert row_a["test"].startswith("def check(candidate):") and row_a["test"].count("assert ") >= 5
        compile(row_a["prompt"] + row_a["canonical_solution"] + row_a["test"], row_a["task_id"], "exec")
    # instances of one template differ too (in what the prompt states)
    for name in code_families.TEMPLATES:
        prompts = {r["prompt"] for r in a if r["task_id"].startswith(f"proc/{name}/")}
        assert len(prompts) == 3, name


def test_terminal_dirs_differ_across_seeds(tmp_path):
    a = terminal_families.generate(tmp_path, 0, 2)
    b = terminal_families.generate(tmp_path, 1, 2)
    assert terminal_families.generate(tmp_path, 0, 2) == a  # reused, not rewritten
    dirs = sorted(p.name for p in a.iterdir())
    assert len(dirs) == 2 * len(terminal_families.TEMPLATES)
    for d in dirs:
        for f in ("task.yaml", "solution.sh", "run-tests.sh", "tests/test_outputs.py"):
            assert (a / d / f).is_file(), (d, f)
        differs = [(a / d / f).read_text() != (b / d / f).read_text() for f in ("task.yaml", "solution.sh")]
        assert any(differs), d


def test_split_is_by_instance_and_deterministic(tmp_path):
    for name in ("code", "terminal"):
        cfg = _cfg(name, tmp_path, instances=10)
        s1, s2 = task_splits(cfg), task_splits(cfg)
        ids = {k: [t.task_id for t in v] for k, v in s1.items()}
        assert ids == {k: [t.task_id for t in v] for k, v in s2.items()}
        assert sum(map(len, ids.values())) == 10 * len(code_families.TEMPLATES if name == "code"
                                                      else terminal_families.TEMPLATES)
        assert not set(ids["train"]) & set(ids["test"])
        template = (lambda tid: tid.split("/")[1]) if name == "code" else (lambda tid: tid.rsplit("-", 1)[0])
        # instances, not templates, are held out: test instances come from templates seen in training
        assert {template(t) for t in ids["test"]} <= {template(t) for t in ids["train"]}


def test_config_validates_procedural_keys():
    with pytest.raises(ConfigError, match=r"env\.code\.procedural\.instances"):
        load_config("conf/code_quickstart.yaml", ["env.code.procedural.instances=0"])
    with pytest.raises(ConfigError, match=r"env\.terminal\.procedural\.templates.*nope.*available"):
        load_config("conf/terminal_quickstart.yaml", ["env.terminal.procedural.templates=[nope]"])


# ----------------------------------------------------------------------------------------- in the sandbox
@needs_sandbox
@pytest.mark.parametrize("template", sorted(code_families.TEMPLATES))
def test_code_reference_passes_and_trivial_fails(template):
    from r2v.envs.code import CodeEnv

    cfg = _cfg("code")
    cfg.code.procedural.templates = [template]
    tasks = CodeEnv.load_tasks(cfg)
    env = CodeEnv.from_config(cfg)
    try:
        for task in tasks:
            res = _play(env, task)
            assert res.success, (task.task_id, res.observation.text)
            assert env.oracle_action() is None
            for wrong in ("return None", "return 0", f"return {task.payload['prompt'].split('(')[1].split(':')[0]}"):
                res = _play(env, task, ["write\n" + wrong, "submit"])
                assert res.done and not res.success, (task.task_id, wrong)
    finally:
        env.close()


@needs_sandbox
@pytest.mark.parametrize("template", sorted(terminal_families.TEMPLATES))
def test_terminal_oracle_solves_and_doing_nothing_fails(template, tmp_path):
    from r2v.envs.terminal import SUBMIT, TerminalEnv

    cfg = _cfg("terminal", tmp_path, instances=1)
    cfg.terminal.procedural.templates = [template]
    (task,) = TerminalEnv.load_tasks(cfg)
    env = TerminalEnv.from_config(cfg)
    try:
        res = _play(env, task)
        assert res.success, (task.task_id, res.info.get("test_output"))
        assert res.info["steps"] == len(Path(task.payload["dir"], "solution.sh").read_text().splitlines()) - 1
        res = _play(env, task, [SUBMIT])
        assert res.done and not res.success, task.task_id
    finally:
        env.close()


def test_benchmark_eval_plays_the_real_tasks_apart_from_the_procedural_ones():
    """eval.benchmark: HumanEval's own problems (capped, in their order) and the bundled Terminal-Bench-layout
    tasks, never the generated instances the quickstart trains and holds out."""
    from r2v.envs.registry import load_tasks
    from r2v.eval.live import benchmark_name, benchmark_tasks

    code = load_config("conf/code_quickstart.yaml", ["eval.benchmark.enabled=true", "eval.benchmark.max_tasks=4"])
    assert [t.task_id for t in benchmark_tasks(code)] == [f"HumanEval/{i}" for i in range(4)]
    assert "HumanEval" in benchmark_name(code) and "first 4" in benchmark_name(code)
    assert code.env.code.procedural.enabled  # the held-out split stays the generated instances
    assert not {t.task_id for t in load_tasks(code.env)} & {f"HumanEval/{i}" for i in range(164)}
    term = load_config("conf/terminal_quickstart.yaml", ["eval.benchmark.enabled=true", "eval.benchmark.max_tasks=null"])
    real = benchmark_tasks(term)
    assert len(real) >= 29 and not {t.task_id for t in real} & {t.task_id for t in load_tasks(term.env)}
    # the benchmark's own step limit: the longest bundled solution.sh has 10 commands, then submit
    from r2v.envs.terminal import _tasks_dir, load_solution
    from r2v.eval.live import benchmark_env

    longest = max(len(load_solution(_tasks_dir(term.env) / t.task_id) or []) for t in real)
    assert benchmark_env(term).max_steps >= longest + 1 > term.env.max_steps


def test_benchmark_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"eval\.benchmark\.methods\[1\].*'entropy'.*eval\.methods"):
        load_config("conf/code_quickstart.yaml", ["eval.benchmark.enabled=true",
                                                  "eval.benchmark.methods=[slm_only,entropy]"])
    with pytest.raises(ConfigError, match=r"eval\.benchmark\.enabled.*procedural\.enabled=true"):
        load_config("conf/code_quickstart.yaml", ["eval.benchmark.enabled=true", "env.code.procedural.enabled=false"])
    with pytest.raises(ConfigError, match=r"eval\.benchmark\.max_tasks"):
        load_config("conf/terminal_quickstart.yaml", ["eval.benchmark.enabled=true", "eval.benchmark.max_tasks=0"])
    with pytest.raises(ConfigError, match=r"eval\.benchmark\.max_steps.*env\.max_steps"):
        load_config("conf/terminal_quickstart.yaml", ["eval.benchmark.max_steps=0"])
