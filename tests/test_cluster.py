"""Cluster definitions (cluster/) and experiment presets (conf/), checked without a cluster: every manifest
parses and has the fields KubeRay / the Ray cluster launcher need, images and versions agree across the
manifests, the Dockerfile and the install script, every job entrypoint names a real file and a config that
validates, the runtime env keeps runs/ and .venv out of uploads, and every preset loads through the schema."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from r2v.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONF = ROOT / "conf"
IMAGE_RE = re.compile(r"^[a-z0-9.\-]+(:[0-9]+)?/[a-z0-9._/\-]+:[A-Za-z0-9._\-]+$")
PAPER = sorted(p for p in (CONF / "paper").glob("*.yaml") if not p.name.startswith("_"))


def _is_r2v_config(path: Path) -> bool:
    """conf/ also holds files in other tools' formats (conf/serve.yaml is a Ray Serve config: `applications:`)."""
    doc = yaml.safe_load(path.read_text()) or {}
    return "applications" not in doc


PRESETS = [p for p in sorted(CONF.glob("*.yaml")) + sorted((CONF / "paper").glob("*.yaml")) if _is_r2v_config(p)]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _pin(text: str, name: str) -> str:
    m = re.search(rf"{re.escape(name)}==([0-9][^\s\"']*)", text)
    assert m, f"no {name}== pin found"
    return m.group(1)


# ----------------------------------------------------------------------------------------- parsing
def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    names = {p.name for p in files}
    assert {"raycluster.yaml", "rayjob.yaml", "ray-up-aws.yaml", "runtime_env.yaml", "storage.yaml"} <= names
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


# ----------------------------------------------------------------------------------------- KubeRay
def _containers(template: dict, where: str) -> list[dict]:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers, f"{where}: no containers"
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container without name/image"
        res = c.get("resources") or {}
        assert res.get("limits") and res.get("requests"), f"{where}/{c['name']}: resources.requests/limits required"
        assert {"cpu", "memory"} <= set(res["limits"]), f"{where}/{c['name']}: cpu and memory limits"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}/{c['name']}: mounts undeclared volume {m['name']!r}"
    return containers


def _gpus(container: dict) -> int:
    res = container["resources"]
    lim = int(res["limits"].get("nvidia.com/gpu", 0))
    if "nvidia.com/gpu" in res["requests"]:  # extended resources: request must equal limit
        assert int(res["requests"]["nvidia.com/gpu"]) == lim
    return lim


def _check_cluster_spec(spec: dict, where: str) -> dict:
    """Fields a KubeRay (ray.io/v1) cluster spec needs; returns {images, gpus per group, mounts}."""
    req = (ROOT / "requirements.txt").read_text()
    assert spec["rayVersion"] == _pin(req, "ray[train,tune,serve]"), f"{where}: rayVersion != requirements.txt's ray"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams must be strings"
    head_c = _containers(head["template"], f"{where}/head")
    ports = {p["containerPort"] for p in head_c[0].get("ports", [])}
    assert {6379, 8265} <= ports, f"{where}: head must expose GCS (6379) and dashboard/Jobs API (8265)"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    out = {"images": {c["image"] for c in head_c}, "gpus": {}, "mounts": []}
    out["mounts"].append({m["mountPath"] for m in head_c[0].get("volumeMounts", [])})
    for g in groups:
        name = g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}/{name}: replica bounds"
        assert isinstance(g["rayStartParams"], dict)
        cs = _containers(g["template"], f"{where}/{name}")
        out["images"] |= {c["image"] for c in cs}
        out["gpus"][name] = _gpus(cs[0])
        out["mounts"].append({m["mountPath"] for m in cs[0].get("volumeMounts", [])})
        if out["gpus"][name]:
            tol = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{where}/{name}: GPU taint toleration"
    assert any(n >= 8 for n in out["gpus"].values()), f"{where}: no 8-GPU worker group"
    return out


def test_raycluster_manifest():
    doc = _one(CLUSTER / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    info = _check_cluster_spec(doc["spec"], "raycluster")
    assert set(info["gpus"]) >= {"gpu-8x"}


def _rayjobs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(CLUSTER.glob("*.yaml")) for d in _docs(p) if d.get("kind") == "RayJob"]


def test_rayjob_manifest():
    jobs = _rayjobs()
    assert jobs, "no RayJob manifest under cluster/"
    for path, doc in jobs:
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["metadata"]["name"], path
        spec = doc["spec"]
        assert spec["entrypoint"].startswith("python jobs/"), path
        assert spec.get("shutdownAfterJobFinishes") is True, path
        _check_cluster_spec(spec["rayClusterSpec"], f"{path.name}/{doc['metadata']['name']}")
        renv = yaml.safe_load(spec["runtimeEnvYAML"])
        _check_runtime_env(renv, f"{path.name} runtimeEnvYAML")
        # the same env vars as cluster/runtime_env.yaml (one source of truth, copied)
        assert renv["env_vars"] == _one(CLUSTER / "runtime_env.yaml")["env_vars"], path


def test_storage_claims_match_the_manifests():
    claims = {d["metadata"]["name"] for d in _docs(CLUSTER / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    used = set()
    for path in (CLUSTER / "raycluster.yaml", CLUSTER / "rayjob.yaml"):
        text = path.read_text()
        used |= set(re.findall(r"claimName:\s*([\w-]+)", text))
    assert used and used <= claims, f"claims used but not defined in storage.yaml: {used - claims}"


# ----------------------------------------------------------------------------------------- images + versions
def _manifest_images() -> dict[str, set[str]]:
    images = {
        "raycluster.yaml": _check_cluster_spec(_one(CLUSTER / "raycluster.yaml")["spec"], "raycluster")["images"],
        "ray-up-aws.yaml": {_one(CLUSTER / "ray-up-aws.yaml")["docker"]["image"]},
    }
    for path, doc in _rayjobs():
        images[f"{path.name}:{doc['metadata']['name']}"] = _check_cluster_spec(doc["spec"]["rayClusterSpec"], path.name)["images"]
    return images


def test_one_image_everywhere_and_built_by_the_dockerfile():
    images = _manifest_images()
    all_images = set().union(*images.values())
    assert len(all_images) == 1, f"manifests disagree on the image: {images}"
    (image,) = all_images
    assert IMAGE_RE.match(image) and not image.endswith(":latest"), f"pin a tag: {image}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"-t {image}" in dockerfile, "cluster/Dockerfile's build command must tag the image the manifests use"


def test_dockerfile_matches_the_local_install():
    df = (CLUSTER / "Dockerfile").read_text()
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", df, re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "devel" in base.group(1), "CUDA devel base image"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", df, re.M)
    # same pins as scripts/bootstrap.sh
    assert re.search(r"^ARG TORCH_VERSION=(\S+)", df, re.M).group(1) == _pin(boot, "torch")
    assert re.search(r"^ARG DEEPSPEED_VERSION=(\S+)", df, re.M).group(1) == _pin(boot, "deepspeed")
    assert "COPY requirements.txt constraints.txt" in df
    assert "pip install -r requirements.txt -c constraints.txt" in df
    assert "--no-build-isolation" in df and "DS_BUILD_" in df, "DeepSpeed ops pre-built without build isolation"
    assert "DS_ACCELERATOR=cuda" in df
    assert re.search(r"pip install .*-e /opt/r2v", df), "r2v installed (editable, next to conf/ and jobs/)"
    assert "bubblewrap" in df, "the code/terminal sandboxes need bwrap"
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignore)


# ----------------------------------------------------------------------------------------- ray up
def test_ray_up_config():
    cfg = _one(CLUSTER / "ray-up-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 8]
    assert gpu_types, "a node type with 8 GPUs"
    assert any("pip install" in c and "r2v" in c for c in cfg["setup_commands"]), "setup_commands install r2v"
    assert "runs/" in cfg["rsync_exclude"] and ".venv/" in cfg["rsync_exclude"]
    try:  # Ray's own validation (private API: fall back to the JSON schema it ships)
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        import json

        import jsonschema
        import ray.autoscaler

        schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
        jsonschema.validate(cfg, schema)
    else:
        validate_config(prepare_config(cfg))


# ----------------------------------------------------------------------------------------- runtime env
def _check_runtime_env(renv: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    excludes = renv.get("excludes", [])
    assert any(e.strip("/") == "runs" for e in excludes), f"{where}: runs/ must be excluded"
    assert any(e.strip("/") == ".venv" for e in excludes), f"{where}: .venv must be excluded"
    env = renv["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), f"{where}: env_vars must be strings"
    assert env["DS_ACCELERATOR"] in {"cuda", "cpu"}
    assert env["PYTHONPATH"] == "platform", f"{where}: workers must import r2v from the uploaded copy"
    # Ray's own type checks; a working_dir inside the image (RayJob) is checked where it is uploaded
    RuntimeEnv(**{k: v for k, v in renv.items() if not (k == "working_dir" and v.startswith("/"))})


def test_runtime_env_file():
    renv = _one(CLUSTER / "runtime_env.yaml")
    assert renv["working_dir"] == "."
    _check_runtime_env(renv, "runtime_env.yaml")
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")


# ----------------------------------------------------------------------------------------- entrypoints
ENTRY_RE = re.compile(r"python (jobs/[\w.-]+\.py)((?: [^\s\\'\"]+)*)")


def _entrypoints() -> list[tuple[str, str]]:
    """Every `python jobs/X.py ...` command written in cluster/ and docs/cluster.md."""
    found = []
    for path in [*sorted(CLUSTER.iterdir()), ROOT / "docs" / "cluster.md"]:
        if path.is_file():
            for m in ENTRY_RE.finditer(path.read_text()):
                found.append((f"{path.name}", m.group(0)))
    return found


def test_entrypoints_name_real_jobs_and_valid_configs():
    found = _entrypoints()
    assert any(src == "rayjob.yaml" for src, _ in found)
    for src, cmd in found:
        argv = shlex.split(cmd)
        assert (ROOT / argv[1]).is_file(), f"{src}: {argv[1]} does not exist"
        if "--config" in argv:
            config = argv[argv.index("--config") + 1]
            if "<" in config:  # a placeholder such as conf/<preset>.yaml in prose
                continue
            overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a and not a.startswith("-")]
            assert (ROOT / config).is_file(), f"{src}: {config} does not exist"
            load_config(ROOT / config, overrides)


def test_rayjob_entrypoint_is_a_paper_preset_with_shared_storage_mounted():
    for path, doc in _rayjobs():
        argv = shlex.split(doc["spec"]["entrypoint"])
        cfg = load_config(ROOT / argv[argv.index("--config") + 1])
        info = _check_cluster_spec(doc["spec"]["rayClusterSpec"], path.name)
        for mounts in info["mounts"]:  # every pod sees runs_dir and the model store at the preset's paths
            assert any(cfg.runs_dir.startswith(m) for m in mounts), (cfg.runs_dir, mounts)
            assert any(cfg.model.path.startswith(m) for m in mounts), (cfg.model.path, mounts)
        assert cfg.bc.num_workers <= max(info["gpus"].values())


# ----------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(CONF)))
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.experiment


def test_quickstart_presets():
    code = load_config(CONF / "code_quickstart.yaml")
    assert code.env.name == "code" and code.policy.mode == "generate"
    term = load_config(CONF / "terminal_quickstart.yaml")
    assert term.env.name == "terminal"
    for cfg in (code, term):
        assert cfg.model.build_from_config and cfg.ray.address is None and cfg.teacher.kind == "oracle"
        assert cfg.model.max_context_tokens - cfg.policy.max_new_tokens >= 128, "room for the prompt"
        assert cfg.model.max_context_tokens <= cfg.model.init.max_position_embeddings


def test_paper_presets(monkeypatch):
    assert {p.name for p in PAPER} >= {
        "textworld_qwen7b.yaml", "humanevalplus_qwen_coder7b.yaml", "terminal_llama8b.yaml"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("R2V_TEACHER_BASE_URL", raising=False)
    for path in PAPER:
        cfg = load_config(path)
        assert cfg.experiment == path.stem, path
        assert not cfg.model.build_from_config and cfg.model.path.startswith("/models/"), path
        assert cfg.model.lora.enabled
        for train in (cfg.bc, cfg.dpo.train):
            assert (train.num_workers, train.use_gpu, train.zero_stage) == (8, True, 3), path
        t = cfg.teacher
        assert t.kind == "openai" and t.base_url.startswith("http") and t.model and t.api_key_env, path
        assert len(set(cfg.router.rollout_seeds)) == 20 and len(set(cfg.eval.perturbation_seeds)) == 20, path
        assert not set(cfg.router.rollout_seeds) & set(cfg.eval.perturbation_seeds), "held-out eval seeds"
        assert cfg.ray.address == "auto"
        assert cfg.tracking.uri.startswith("http"), path
        assert cfg.runs_dir.startswith("/"), "runs_dir on shared storage"
    # the runtime env's MLFLOW_TRACKING_URI / R2V_TEACHER_BASE_URL reach the presets
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("R2V_TEACHER_BASE_URL", "http://vllm.example:8000/v1")
    cfg = load_config(PAPER[0])
    assert cfg.tracking.uri == "http://mlflow.example:5000"
    assert cfg.teacher.base_url == "http://vllm.example:8000/v1"
