"""The experiment layout (r2v.experiment) and init-model's rule that a model directory is an input."""
import hashlib
import json
from pathlib import Path

import pytest

from r2v.config import load_config
from r2v.errors import ConfigError, R2VError
from r2v.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "conf" / "quickstart.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(QUICKSTART, [f"runs_dir={tmp_path / 'runs'}", "experiment=exp", *overrides])


def _hf_dir(path: Path) -> Path:
    """A real (tiny, random) HF causal-LM directory, as a user's checkpoint would be."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_every_stage_path_is_under_the_experiment_root(tmp_path):
    from r2v.pipeline import STAGE_NAMES, marker_path

    cfg = _cfg(tmp_path, "router.branch_teacher_steps=3")
    exp = Experiment(cfg)
    root = tmp_path / "runs" / "exp"
    assert exp.root == root == cfg.experiment_dir
    assert exp.model("init") == Path(cfg.model.path).resolve() == root / "models" / "init"
    assert exp.branches == root / "rollouts" / "branches-m3"  # branch episodes depend on m
    assert {exp.rollouts("teacher"), exp.pair_probes, exp.slm_router_rollouts} == {
        root / "rollouts" / p for p in ("teacher", "pair-probes", "slm-router")}
    for stage in STAGE_NAMES:
        assert marker_path(cfg, stage) == exp.marker(stage) == root / ".stages" / f"{stage}.json"


@pytest.mark.parametrize("trained,expected", [((), None), (("bc",), "bc"), (("bc", "dpo"), "dpo"), (("dpo",), "dpo")])
def test_deployed_policy_is_dpo_else_bc_else_the_base_model_for_every_caller(tmp_path, trained, expected):
    from r2v.serve.components import slm_path

    cfg = _cfg(tmp_path)
    exp = Experiment(cfg)
    _hf_dir(exp.model("init"))
    for stage in trained:  # an adapter-only (LoRA) directory counts as a model
        (exp.model(stage)).mkdir(parents=True)
        (exp.model(stage) / ("adapter_config.json" if stage == "dpo" else "config.json")).write_text("{}")
    (exp.models_dir / "router").mkdir(parents=True)  # other models never count
    want = exp.model(expected) if expected else Path(cfg.model.path)
    assert exp.deployed_policy_dir() == want
    assert slm_path(cfg, exp.models_dir) == str(want)  # Serve deploys the same directory


def test_deployed_policy_follows_the_selection_file_for_every_caller(tmp_path):
    from r2v.serve.components import slm_path

    cfg = _cfg(tmp_path)
    exp = Experiment(cfg)
    for stage in ("bc", "dpo"):
        exp.model(stage).mkdir(parents=True)
        (exp.model(stage) / "config.json").write_text("{}")
    assert exp.selection_file == exp.models_dir / "selected.json"
    assert exp.deployed_policy_dir() == exp.model("dpo")  # no decision yet: today's rule
    exp.selection_file.write_text(json.dumps({"selected": "bc"}))
    assert exp.deployed_policy_dir() == exp.model("bc")  # DPO exists, but validation chose BC
    assert slm_path(cfg, exp.models_dir) == str(exp.model("bc"))  # Serve deploys the same directory
    exp.selection_file.write_text(json.dumps({"selected": "sft"}))
    with pytest.raises(R2VError, match=r"selected\.json: `selected` must be one of \['dpo', 'bc'\]"):
        exp.deployed_policy_dir()
    exp.selection_file.write_text("{oops")
    with pytest.raises(R2VError, match=r"selected\.json is not valid JSON .*re-run `r2v select-policy`"):
        exp.deployed_policy_dir()
    exp.selection_file.write_text(json.dumps({"selected": "dpo"}))
    (exp.model("dpo") / "config.json").unlink()  # the chosen model is gone: never fall back silently
    with pytest.raises(R2VError, match=r"selects dpo but .*dpo holds no model"):
        exp.deployed_policy_dir()


def test_init_model_never_writes_into_a_checkpoint_it_did_not_build(tmp_path):
    from r2v.policies.init_model import run_init_model

    cfg = _cfg(tmp_path)  # build_from_config=true, model.path = runs/exp/models/init (the defaults)
    ckpt = _hf_dir(Experiment(cfg).model("init"))  # a user's checkpoint copied where init-model writes
    before = _digest(ckpt)
    with pytest.raises(R2VError, match=rf"{ckpt} already holds a model \(config\.json.*did not build.*"
                                       rf"set model\.path={ckpt} model\.build_from_config=false"):
        run_init_model(cfg)
    assert _digest(ckpt) == before  # byte for byte

    cfg.model.path = str(_hf_dir(tmp_path / "store" / "ckpt"))  # changed after load: checked again
    with pytest.raises(ConfigError, match=r"model\.build_from_config=true builds a fresh model"):
        run_init_model(cfg)
    cfg.model.build_from_config = False
    assert run_init_model(cfg) == {"path": cfg.model.path, "built": False}


def test_init_model_rebuilds_its_own_model_but_not_another_experiments(tmp_path):
    from r2v.config import TinyModelConfig
    from r2v.policies.init_model import INIT_MARKER, save_tiny_model

    arch = TinyModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, vocab_size=300)
    texts = ["go north", "take the key", "open the door"] * 20
    out = tmp_path / "models" / "init"
    assert save_tiny_model(texts, arch, out, 64, experiment="a")["experiment"] == "a"
    save_tiny_model(texts, arch, out, 64, experiment="a")  # re-running init-model replaces its own output
    before = _digest(out)
    with pytest.raises(R2VError, match=r"did not build for experiment 'b'"):
        save_tiny_model(texts, arch, out, 64, experiment="b")
    assert _digest(out) == before
    legacy = json.loads((out / INIT_MARKER).read_text())
    del legacy["experiment"]  # markers written before the field: r2v built them
    (out / INIT_MARKER).write_text(json.dumps(legacy))
    save_tiny_model(texts, arch, out, 64, experiment="b")


def test_no_other_module_spells_the_experiment_layout():
    """Paths under runs/<exp>/ come from Experiment: a `cfg.experiment_dir / "..."` elsewhere is a second
    home for the layout, which is how `dpo, else bc` came to be written twice."""
    import re

    pattern = re.compile(r"experiment_dir\)?\s*/")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "platform" / "r2v").rglob("*.py"))
                 if p.name != "experiment.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"use r2v.experiment.Experiment instead: {offenders}"
