"""Stage graph orchestration: skip completed stages, re-run on config change, --from forces."""
import json

import pytest

from r2v import pipeline
from r2v.config import load_config
from r2v.errors import R2VError, StageNotBuilt

CALLS: list[str] = []


def first(cfg):
    CALLS.append("first")
    return {"items": 3}


def second(cfg):
    CALLS.append("second")
    return {"score": 0.5}


@pytest.fixture
def graph(monkeypatch):
    CALLS.clear()
    stages = (
        pipeline.Stage("first", f"{__name__}:first", ("env",), "conf", "a", 0),
        pipeline.Stage("second", f"{__name__}:second", ("router",), "a", "b", 0),
        pipeline.Stage("later", None, (), "b", "c", 99),
    )
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", tuple(s.name for s in stages))
    return stages


def test_rerun_skips_completed_and_config_change_reruns(tmp_path, graph):
    cfg = load_config(None, [f"runs_dir={tmp_path}", "experiment=p"])
    rows = pipeline.run_pipeline(cfg, echo=lambda s: None)
    assert CALLS == ["first", "second"]
    assert [r["status"] for r in rows] == ["ran", "ran", "not built"]
    marker = json.loads((tmp_path / "p" / ".stages" / "first.json").read_text())
    assert marker["summary"] == {"items": 3}

    pipeline.run_pipeline(cfg, echo=lambda s: None)
    assert CALLS == ["first", "second"]  # nothing re-ran

    changed = load_config(None, [f"runs_dir={tmp_path}", "experiment=p", "router.budget=0.9"])
    pipeline.run_pipeline(changed, echo=lambda s: None)
    assert CALLS == ["first", "second", "second"]  # only the stage that reads `router`

    pipeline.run_pipeline(changed, from_stage="first", echo=lambda s: None)
    assert CALLS[-2:] == ["first", "second"]  # --from forces it and everything after


def test_unknown_and_unbuilt_stages_are_clear(tmp_path, graph):
    cfg = load_config(None, [f"runs_dir={tmp_path}"])
    with pytest.raises(R2VError, match="unknown stage 'nope'.*first, second, later"):
        pipeline.run_stage(cfg, "nope")
    with pytest.raises(StageNotBuilt, match="issue #99"):
        pipeline.run_stage(cfg, "later")
