"""Config: YAML layering, dotlist overrides, and the errors a user sees."""
from pathlib import Path

import pytest

from r2v.config import R2VConfig, config_hash, load_config, to_yaml
from r2v.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "conf" / "quickstart.yaml"


def test_quickstart_layers_defaults_then_file_then_overrides():
    cfg = load_config(QUICKSTART, ["env.max_steps=17", "policy.num_candidates=3"])
    assert isinstance(cfg, R2VConfig)
    assert cfg.experiment == "quickstart"  # from the preset, over base.yaml's `default`
    assert cfg.env.name == "textworld"  # from defaults: env/textworld
    assert cfg.model.init.hidden_size == 128  # from defaults: model/tiny
    assert cfg.env.textworld.levels == [3, 4, 5, 6, 7, 8]  # preset wins over env/textworld.yaml
    assert cfg.env.max_steps == 17 and cfg.policy.num_candidates == 3  # overrides win over everything
    assert cfg.model.path == "runs/quickstart/models/init"  # interpolation resolved


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"bogus"):
        load_config(QUICKSTART, ["bogus.key=1"])
    with pytest.raises(ConfigError, match=r"env\.max_stepz.*did you mean: env\.max_steps"):
        load_config(QUICKSTART, ["env.max_stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  textworld:\n    levelz: [1]\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*env\.textworld\.levelz.*env\.textworld\.levels"):
        load_config(bad)


def test_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"env\.max_steps.*Integer"):
        load_config(QUICKSTART, ["env.max_steps=lots"])


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("env: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)
    missing_default = tmp_path / "md.yaml"
    missing_default.write_text("defaults: [env/nowhere]\n")
    with pytest.raises(ConfigError, match="env/nowhere"):
        load_config(missing_default)


@pytest.mark.parametrize(
    "override,field",
    [
        ("policy.mode=beam", "policy.mode"),
        ("env.split_fractions=[0.5,0.5,0.5]", "env.split_fractions"),
        ("env.perturbations.distractors=1.5", "env.perturbations.distractors"),
        ("bc.zero_stage=4", "bc.zero_stage"),
        ("dpo.train.lr_schedule=cosine", "dpo.train.lr_schedule"),
        ("bc.rank_negatives=0", "bc.rank_negatives"),
        ("router.alpha=0", "router.alpha"),
        ("router.grace=-1", "router.grace"),
        ("router.fit_split=train", "router.cross_fit"),
        ("router.threshold=bayes", "router.choose_budget"),
        ("eval.budgets=[]", "router.choose_budget"),
        ("eval.paced_methods=[entropy]", "eval.paced_methods"),
        ("eval.pace_wave=0", "eval.pace_wave"),
        ("not_an_override", "key=value"),
    ],
)
def test_semantic_validation(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(QUICKSTART, [override])


def test_every_preset_validates():
    import yaml

    presets = sorted(p for p in (REPO / "conf").rglob("*.yaml")
                     if "applications" not in (yaml.safe_load(p.read_text()) or {}))  # not Ray Serve configs
    assert QUICKSTART in presets and len(presets) >= 8
    for preset in presets:
        cfg = load_config(preset)
        assert to_yaml(cfg)  # round-trips through OmegaConf


def test_config_hash_tracks_only_named_sections():
    a = load_config(QUICKSTART)
    b = load_config(QUICKSTART, ["router.budget=0.5"])
    assert config_hash(a, "env") == config_hash(b, "env")
    assert config_hash(a, "router") != config_hash(b, "router")


@pytest.mark.parametrize(
    "override,message",
    [
        ("env.name=textworl", r"`env\.name` = 'textworl'.*did you mean: textworld\?"),
        ("router.kind=entropi", r"`router\.kind` = 'entropi' is not one of \[.*'r2v'.*\].*did you mean: entropy\?"),
        ("router.label=brnch", r"`router\.label` = 'brnch'.*did you mean: branch\?"),
        ("router.threshold=bayse", r"`router\.threshold` = 'bayse'.*did you mean: bayes\?"),
        ("router.calibration=plat", r"`router\.calibration` = 'plat'.*did you mean: platt\?"),
        ("policy.select=logprobs", r"`policy\.select` = 'logprobs'.*did you mean: logprob\?"),
        ("teacher.kind=openia", r"`teacher\.kind` = 'openia'.*did you mean: openai\?"),
        ("ray.slm_server=per-worker", r"`ray\.slm_server` = 'per-worker'.*did you mean: per_worker\?"),
        ("model.dtype=float61", r"`model\.dtype` = 'float61'.*did you mean: float16\?"),
        ("bc.lr_schedule=linera", r"`bc\.lr_schedule` = 'linera'.*did you mean: linear\?"),
        ("dpo.trainer=trll", r"`dpo\.trainer` = 'trll' is not one of \['r2v', 'trl'\].*did you mean: trl\?"),
        ("bc.keep_epoch=val_rank", r"`bc\.keep_epoch` = 'val_rank'.*did you mean: val_rank_acc\?"),
        ("eval.methods=[r2v,entropi]", r"`eval\.methods\[1\]` = 'entropi'.*did you mean: entropy\?"),
        ("eval.methods=[r2v@0.2]", r"`eval\.methods\[0\]` = 'r2v@0\.2'.*eval\.budgets"),
        ("eval.methods=[]", r"`eval\.methods` is empty"),
        ("sweep.labels=[episod]", r"`sweep\.labels\[0\]` = 'episod'.*did you mean: episode\?"),
        ("sweep.thresholds=[budget,cvr]", r"`sweep\.thresholds\[1\]` = 'cvr'.*did you mean: cvar\?"),
        ("serve.router=r2b", r"`serve\.router` = 'r2b'.*did you mean: r2v\?"),
        ("model.device=cdua", r"`model\.device` = 'cdua' is not a device.*did you mean: cuda\?"),
        ("router.device=cuda:x", r"`router\.device` = 'cuda:x' is not a device"),
        ("verifier.device=gpu", r"`verifier\.device` = 'gpu' is not a device: use one of \['auto', 'cpu'"),
    ],
)
def test_enumerated_values_fail_at_load_with_the_closest_valid_one(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override])


def test_keeping_the_best_rank_accuracy_epoch_needs_rank_mode():
    with pytest.raises(ConfigError, match=r"`bc\.keep_epoch=val_rank_acc` needs `policy\.mode=rank`.*val_loss"):
        load_config(QUICKSTART, ["bc.keep_epoch=val_rank_acc", "policy.mode=generate"])
    assert load_config(QUICKSTART, ["bc.keep_epoch=val_loss", "policy.mode=generate"]).bc.keep_epoch == "val_loss"


def test_valid_device_names_load():
    cfg = load_config(QUICKSTART, ["model.device=cuda:1", "router.device=cpu", "verifier.device=mps"])
    assert (cfg.model.device, cfg.router.device, cfg.verifier.device) == ("cuda:1", "cpu", "mps")


def test_config_vocabulary_matches_the_router_registries():
    """config.ROUTER_KINDS / LABELS are what validation accepts; the routers and labels that exist are
    registered in r2v.router. A router added there but not here would be rejected at load."""
    from r2v.config import LABELS, ROUTER_KINDS
    from r2v.router.baselines import ROUTERS
    from r2v.router.model import LABEL_COLUMNS

    assert set(ROUTER_KINDS) == set(ROUTERS)
    assert set(LABELS) == set(LABEL_COLUMNS)


def test_resolve_device_is_the_one_place_auto_becomes_a_device(monkeypatch):
    import torch

    from r2v.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"`router\.device` = 'cuda:0' but no CUDA device is visible"):
        resolve_device("cuda:0", "router.device")
    with pytest.raises(ConfigError, match=r"`model\.device` = 'gpu' is not a device"):
        resolve_device("gpu", "model.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert torch.device(resolve_device("auto")).type == "cuda"  # torch.device("auto") itself raises


def test_a_pretrained_model_path_with_build_from_config_fails_at_load(tmp_path):
    ckpt = tmp_path / "Qwen2.5-7B-Instruct"
    with pytest.raises(ConfigError, match=rf"`model\.path` = {ckpt} but model\.build_from_config=true.*"
                                          r"set model\.build_from_config=false"):
        load_config(QUICKSTART, [f"model.path={ckpt}"])
    cfg = load_config(QUICKSTART, [f"model.path={ckpt}", "model.build_from_config=false"])
    assert cfg.model.path == str(ckpt)
