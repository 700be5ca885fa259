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
