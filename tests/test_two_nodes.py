"""Two Ray nodes on one machine: a head (`ray start --head`, resource node_a) and a second node joining it
(resource node_b), 1 CPU each, so that a job which needs 2 CPUs must use both. The stages then run as on a
cluster (`ray.address` set, a shared runs_dir): teacher collection, whose two env-worker actors must land on
different nodes and still write every planned episode exactly once, then BC on Ray Train with 2 DeepSpeed
(gloo) workers, one per node.

Each node is started with `--block` in its own session and stopped by killing exactly its process tree
(never `ray stop`, which would stop every Ray instance on the machine)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_ray import free_ports, kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def _start_node(env: dict, tmp: Path, name: str, args: list[str]) -> subprocess.Popen:
    """`ray start --block` for one node, with every port of its own chosen free (two raylets share the host)."""
    agent_listen, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr = free_ports(6)
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [ray_bin, "start", "--block", "--disable-usage-stats",
           "--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps({name: 1})}",
           f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", *args]
    log = open(tmp / f"ray-{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)


# The driver runs in its own process, with the cluster's token in its environment (Ray reads its auth mode
# once per process): it waits for both nodes, prints {resource: node id}, then runs the pipeline's first
# stages through the CLI, which connects through `ray.address`.
DRIVER = """
import json, sys, time, ray
ray.init(address=sys.argv[1])
deadline = time.time() + float(sys.argv[2])
while True:
    nodes = {r: n["NodeID"] for n in ray.nodes() if n["Alive"] for r in ("node_a", "node_b") if r in n["Resources"]}
    if len(nodes) == 2 or time.time() > deadline:
        break
    time.sleep(0.5)
print("R2V_NODES " + json.dumps(nodes), flush=True)
ray.shutdown()
if len(nodes) < 2:
    sys.exit("the second node never joined")
from r2v.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def two_nodes():
    """(address, environment for its drivers, folder of the nodes' logs) of a 2-node cluster, token auth on."""
    pytest.importorskip("psutil")
    tmp = Path(tempfile.mkdtemp(prefix="r2v2n-", dir="/tmp"))  # short: unix socket paths are limited
    gcs, client = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # token auth (Ray 2.60's default for `ray start`) with a token of our own, passed through the environment
    # to both nodes and to the driver: ~/.ray is neither read nor written
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    address = f"127.0.0.1:{gcs}"
    procs = [_start_node(env, tmp, "node_a", ["--head", f"--port={gcs}", "--include-dashboard=false",
                                              f"--ray-client-server-port={client}", f"--temp-dir={tmp / 'ray'}"])]
    try:
        procs.append(_start_node(env, tmp, "node_b", [f"--address={address}"]))  # retries until the head is up
        yield address, env, tmp
    finally:
        for p in reversed(procs):
            kill_tree(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_collection_and_bc_spread_over_two_nodes(two_nodes, tw_cfg, tmp_path):
    """Must hold on a 2-node cluster of 1 CPU per node:
    - teacher collection runs one env worker on each node and writes exactly one shard per planned episode
      (no episode lost, none duplicated), each a complete episode;
    - BC's two Ray Train workers run one on each node and produce a consolidated HF model."""
    from r2v.config import load_config
    from r2v.data import ShardStore
    from r2v.pipeline import read_marker
    from r2v.rollout.engine import plan_units
    from r2v.rollout.stage import tasks_by_split

    address, env, logs = two_nodes
    tw = tw_cfg.textworld
    overrides = [
        "experiment=twonodes", f"runs_dir={tmp_path / 'runs'}", f"ray.address={address}", "tracking.enabled=false",
        f"env.textworld.challenge={tw.challenge}", f"env.textworld.levels={list(tw.levels)}",
        f"env.textworld.games_per_level={tw.games_per_level}", f"env.textworld.cache_dir={tw.cache_dir}",
        "collect.num_workers=2", "collect.cpus_per_worker=1", "collect.perturbation_seeds=[0,1]",
        "model.init.hidden_size=64", "model.init.intermediate_size=128", "model.init.vocab_size=400",
        "bc.num_workers=2", "bc.zero_stage=2", "bc.epochs=1", "bc.per_device_batch_size=8",
    ]
    args = ["run", "--until", "train-bc", "--config", str(ROOT / "conf" / "base.yaml"), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, address, str(START_TIMEOUT_S), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=840)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    ray_logs = "\n".join(p.read_text()[-1500:] for p in logs.glob("ray-*.log"))
    assert proc.returncode == 0, f"{out[-6000:]}\n--- ray start logs ---\n{ray_logs}"
    nodes = json.loads(next(line for line in out.splitlines() if line.startswith("R2V_NODES "))[len("R2V_NODES "):])
    assert len(set(nodes.values())) == 2

    cfg = load_config(str(ROOT / "conf" / "base.yaml"), overrides)
    collected = read_marker(cfg, "collect-teacher")["summary"]
    units = plan_units(tasks_by_split(cfg, ["train", "val"]), cfg.collect.perturbation_seeds,
                       cfg.collect.episodes_per_task, "teacher")
    assert collected["episodes_run"] == len(units) >= 8
    used = {n for ns in collected["worker_nodes"].values() for n in ns}
    assert used == set(nodes.values()), (collected["worker_nodes"], nodes)  # an env worker on each node
    store = ShardStore(cfg.experiment_dir / "rollouts" / "teacher", "steps")
    assert len(store.files()) == len(units) and store.completed_keys() == {u.key for u in units}  # one shard each
    df = store.read_pandas()
    assert df["episode_id"].nunique() == len(units) and not df.duplicated(["episode_id", "step"]).any()
    for _, ep in df.sort_values("step").groupby("episode_id"):  # whole episodes: steps 0..n-1, ended
        assert list(ep["step"]) == list(range(len(ep)))
        assert bool(ep["done"].iloc[-1]) or len(ep) == cfg.env.max_steps

    trained = read_marker(cfg, "train-bc")["summary"]
    assert sorted(trained["worker_nodes"]) == sorted(nodes.values())  # rank 0 and rank 1 on different nodes
    assert trained["steps"] >= 1 and (cfg.experiment_dir / "models" / "bc" / "config.json").is_file()
    print(f"[two-nodes] driver wall {wall:.1f} s for {len(units)} teacher episodes + 1 BC epoch; per stage:\n"
          + proc.stdout[proc.stdout.rfind("\nstage "):])
