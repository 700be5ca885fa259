"""Stage graph with provenance: a stage re-runs when its own config sections or any upstream stage changed,
`--dry-run` says which and why without running anything, `--from` forces. Markers on disk, no Ray."""
import json

import pytest

from r2v import pipeline
from r2v.cli import main
from r2v.config import load_config
from r2v.errors import R2VError

CALLS: list[str] = []


def record(cfg):
    CALLS.append(cfg.experiment)
    return {"items": 3, "score": 0.5}


def fake_stage(name, reads, upstream=()):
    return pipeline.Stage(name, f"{__name__}:record", reads, upstream, "test product")


@pytest.fixture
def graph(monkeypatch):
    """first -> second -> third, and first -> side (side does not consume second)."""
    stages = (
        fake_stage("first", ("env",)),
        fake_stage("second", ("bc",), ("first",)),
        fake_stage("third", ("router",), ("second",)),
        fake_stage("side", ("eval",), ("first",)),
    )
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", tuple(s.name for s in stages))
    CALLS.clear()
    return stages


def cfg_with(tmp_path, *overrides):
    return load_config(None, [f"runs_dir={tmp_path}", "experiment=p", "tracking.enabled=false", *overrides])


def decisions(cfg, **kw):
    return {d.stage: (d.action, d.reason) for d in pipeline.plan(cfg, **kw)}


def test_unchanged_skips_and_own_section_change_reruns_downstream_only(tmp_path, graph):
    cfg = cfg_with(tmp_path)
    assert decisions(cfg) == {s: ("run", "no marker (never ran)") for s in ("first", "second", "third", "side")}
    lines: list[str] = []
    rows = pipeline.run_pipeline(cfg, echo=lines.append)
    assert [r["status"] for r in rows] == ["ran"] * 4 and len(CALLS) == 4
    assert "running (no marker (never ran))" in lines[0] and lines[1].endswith("items=3  score=0.5")
    marker = json.loads((tmp_path / "p" / ".stages" / "second.json").read_text())
    assert marker["summary"] == {"items": 3, "score": 0.5} and set(marker["upstream"]) == {"first"}

    assert all(a == "skip" for a, _ in decisions(cfg).values())
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    assert len(CALLS) == 4  # nothing re-ran

    changed = cfg_with(tmp_path, "bc.epochs=7")
    assert decisions(changed) == {
        "first": ("skip", "up to date"),
        "second": ("run", "config section bc changed"),
        "third": ("run", "upstream second will re-run"),
        "side": ("skip", "up to date"),  # consumes first only
    }
    rows = pipeline.run_pipeline(changed, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["skipped", "ran", "ran", "skipped"]
    assert all(a == "skip" for a, _ in decisions(changed).values())


def test_upstream_rerun_outside_the_pipeline_invalidates_downstream(tmp_path, graph):
    cfg = cfg_with(tmp_path)
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    pipeline.run_stage(cfg, "second")  # e.g. `r2v train-bc` by hand: same config, new products
    got = decisions(cfg)
    assert got["second"] == ("skip", "up to date")
    assert got["third"] == ("run", "upstream second changed since this stage ran")
    assert got["first"][0] == got["side"][0] == "skip"


def test_content_addressed_stage_rerun_with_same_bytes_keeps_downstream(tmp_path, graph, monkeypatch):
    """A stage with deterministic products (e.g. `r2v tasks` run by hand) is identified by their bytes: the
    same bytes keep downstream up to date, different bytes re-run it."""
    product = tmp_path / "product.txt"
    product.write_text("v1")
    monkeypatch.setattr(pipeline, "CONTENT_ADDRESSED", {"second": lambda exp: [product]})
    cfg = cfg_with(tmp_path)
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    pipeline.run_stage(cfg, "second")
    assert decisions(cfg)["third"] == ("skip", "up to date")
    product.write_text("v2")
    pipeline.run_stage(cfg, "second")
    assert decisions(cfg)["third"] == ("run", "upstream second changed since this stage ran")


def test_content_digest_covers_names_and_bytes(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x" * 3_000_000)  # more than one read block
    first = pipeline.content_digest([d])
    assert pipeline.content_digest([d]) == first
    (d / "a.bin").write_bytes(b"x" * 2_999_999 + b"y")
    assert pipeline.content_digest([d]) != first
    (d / "a.bin").rename(d / "b.bin")
    assert pipeline.content_digest([d]) not in (first, pipeline.content_digest([tmp_path / "missing"]))


def test_from_forces_and_until_stops(tmp_path, graph):
    cfg = cfg_with(tmp_path)
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    got = decisions(cfg, from_stage="second")
    assert got == {"first": ("skip", "up to date"), "second": ("run", "forced by --from"),
                   "third": ("run", "forced by --from"), "side": ("run", "forced by --from")}
    assert list(decisions(cfg, until="second")) == ["first", "second"]
    CALLS.clear()
    pipeline.run_pipeline(cfg, from_stage="third", until="third", echo=lambda s: None)
    assert len(CALLS) == 1


def test_old_unreadable_and_missing_markers(tmp_path, graph):
    cfg = cfg_with(tmp_path)
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    stages = tmp_path / "p" / ".stages"
    (stages / "first.json").write_text(json.dumps({"stage": "first", "config_hash": "0123abcd", "wall_s": 1.0}))
    (stages / "side.json").write_text("{not json")
    got = decisions(cfg)
    assert got["first"] == ("run", "marker predates provenance (written by an older r2v)")
    assert got["second"] == ("run", "upstream first will re-run")
    assert got["side"][1].startswith("marker unreadable")


def test_unknown_stage_is_clear(tmp_path, graph):
    cfg = cfg_with(tmp_path)
    with pytest.raises(R2VError, match="unknown stage 'nope'.*first, second, third, side"):
        pipeline.run_stage(cfg, "nope")
    with pytest.raises(R2VError, match="unknown stage 'nope'"):
        pipeline.plan(cfg, from_stage="nope")


def test_real_graph_is_ordered_and_names_real_stages():
    seen = set()
    for stage in pipeline.STAGES:
        assert set(stage.upstream) <= seen, (stage.name, set(stage.upstream) - seen)  # consumed before produced
        seen.add(stage.name)
        assert ":" in stage.target


def test_dry_run_on_the_quickstart_graph(tmp_path, monkeypatch, capsys):
    """The issue's acceptance on the real stage graph and config: after a full run every stage is `skip`;
    with bc.epochs=3 train-bc and everything downstream of it is `run`, the stages upstream `skip`."""
    monkeypatch.setattr(pipeline.Stage, "function", lambda self: (lambda cfg: {"stage": self.name}))
    base = ["--config", "conf/quickstart.yaml", f"runs_dir={tmp_path}", "tracking.enabled=false"]
    pipeline.run_pipeline(load_config("conf/quickstart.yaml", base[2:]), echo=lambda s: None)

    def dry(*extra):
        capsys.readouterr()
        assert main(["run", *base, *extra, "--dry-run", "--json"]) == 0
        return {d["stage"]: (d["action"], d["reason"]) for d in json.loads(capsys.readouterr().out)}

    assert {a for a, _ in dry().values()} == {"skip"}
    got = dry("bc.epochs=3")
    names = list(pipeline.STAGE_NAMES)
    at = names.index("train-bc")
    assert all(got[s] == ("skip", "up to date") for s in names[:at])
    assert got["train-bc"] == ("run", "config section bc changed")
    assert all(got[s][0] == "run" and got[s][1].startswith("upstream ") for s in names[at + 1:]), got
    got = dry("eval.budgets=[0.2,0.4]")  # train-router reads this one key of eval (it picks the default budget)
    assert got["train-router"] == ("run", "config section eval.budgets changed") and got["sweep"][0] == "skip"
    assert got["eval"] == ("run", "config section eval changed")
    import ray

    assert not ray.is_initialized()  # a dry run starts nothing

    assert main(["run", *base, "--dry-run", "--from", "sweep"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[names.index("sweep")].split()[:2] == ["sweep", "run"] and "forced by --from" in lines[-1]


def test_a_new_slm_selection_reruns_every_stage_that_plays_the_deployed_slm(tmp_path, monkeypatch):
    """select-policy decides which SLM (bc | dpo) later stages play and Serve deploys: a re-run that reaches the
    same decision changes nothing; a new decision re-runs collect-router … report and nothing that trains the
    candidates."""
    from r2v.experiment import Experiment

    decision = {"selected": "bc"}

    def fake(self):
        def fn(cfg):
            if self.name == "select-policy":
                Experiment(cfg).selection_file.parent.mkdir(parents=True, exist_ok=True)
                Experiment(cfg).selection_file.write_text(json.dumps(decision))
            return {"stage": self.name}
        return fn

    monkeypatch.setattr(pipeline.Stage, "function", fake)
    cfg = load_config("conf/quickstart.yaml", [f"runs_dir={tmp_path}", "tracking.enabled=false"])
    names = list(pipeline.STAGE_NAMES)
    assert names.index("train-dpo") < names.index("select-policy") < names.index("collect-router")
    pipeline.run_pipeline(cfg, echo=lambda s: None)
    pipeline.run_stage(cfg, "select-policy")  # the same decision, byte for byte
    assert all(a == "skip" for a, _ in decisions(cfg).values())
    decision["selected"] = "dpo"
    pipeline.run_stage(cfg, "select-policy")
    got = decisions(cfg)
    users = ("collect-router", "train-router", "sweep", "eval", "report")
    for stage in users:
        assert "select-policy" in pipeline.get_stage(stage).upstream, stage
        assert got[stage][0] == "run" and got[stage][1].startswith("upstream "), stage
    assert got["collect-router"] == ("run", "upstream select-policy changed since this stage ran")
    assert all(got[s] == ("skip", "up to date") for s in names if s not in users)
    got = decisions(load_config("conf/quickstart.yaml", [f"runs_dir={tmp_path}", "tracking.enabled=false",
                                                        "selection.seeds=[0,1]"]))
    assert got["select-policy"] == ("run", "config section selection changed")
    assert got["collect-router"] == ("run", "upstream select-policy will re-run")
