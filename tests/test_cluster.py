"""Scaling out without a cloud: the cluster configs pass Ray's own checks, a real 2-node Ray cluster on this
machine runs a sweep into an MLflow server started as cluster.yaml's head starts it, and train_ddp.py trains as
one job across two torchrun "nodes". Every server listens on 127.0.0.1 and is stopped by its process ids
(tests/_procs.py)."""

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests._dist import free_port, free_ports
from tests._procs import http_status, mlflow_healthy, port_open, start, stop_session, tail, wait_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def load_config(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def prepared(cfg: dict) -> dict:
    """What `ray up` does to a config before it touches a cloud: Ray's defaults, merges and checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The cluster launcher configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_passes_rays_schema_and_config_checks(name):
    import jsonschema

    raw = load_config(name)
    jsonschema.validate(raw, ray_schema())  # what the user wrote, before Ray fills anything in
    cfg = prepared(raw)
    jsonschema.validate(cfg, ray_schema())  # and after
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert all(isinstance(c, str) for c in cfg[key]), key
    # The project is copied to every node and installed (editable) with pinned versions that pyproject.toml
    # admits; Ray pinned to the client's own version, as a cluster needs one Ray version everywhere.
    from importlib.metadata import requires

    import ray
    from packaging.requirements import Requirement

    assert "." in cfg["file_mounts"].values()
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"pip install .*-e \S*stbp", setup), setup
    declared = {r.name: r for r in map(Requirement, requires("stbp")) if r.marker is None}
    pins = [Requirement(p) for p in re.findall(r'"([\w\[\],.-]+==[^"]+)"', setup)]
    assert {p.name for p in pins} == {"torch", "torchvision", "ray", "mlflow", "optuna"}, setup
    for pin in pins:
        (version,) = [s.version for s in pin.specifier]
        assert declared[pin.name].specifier.contains(version), (pin, declared[pin.name])
    assert f'"ray[default,tune]=={ray.__version__}"' in setup


def test_aws_cluster_has_a_cpu_head_spot_gpu_workers_docker_and_shared_memory():
    import ray

    raw = load_config("cluster.yaml")
    cfg = prepared(raw)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["cache_stopped_nodes"] is True
    assert cfg["provider"]["region"] and cfg["provider"]["availability_zone"]
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # no trial lands on the head
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand head
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instances
    assert all(t["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"} for t in workers)
    docker = cfg["docker"]
    assert docker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    options = docker["run_options"] + docker["head_run_options"] + docker["worker_run_options"]
    assert sum(o.startswith("--shm-size=") for o in options) == 2  # head and workers, each sized
    assert "--volume=/mnt/shared:/mnt/shared" in docker["run_options"]
    assert "--env=RAY_AUTH_MODE=token" in docker["run_options"]


def test_onprem_cluster_uses_the_local_provider_without_node_types():
    raw = load_config("cluster-onprem.yaml")
    assert raw["provider"]["type"] == "local" and "available_node_types" not in raw
    cfg = prepared(raw)
    (node_type,) = cfg["available_node_types"].values()  # the one Ray makes for on-prem clusters
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "where, good, typo",
    [((), "head_setup_commands", "head_setup_comands"), (("auth",), "ssh_user", "ssh_usr")],
)
def test_a_misspelt_key_is_rejected(name, where, good, typo):
    import jsonschema

    cfg = load_config(name)
    section = cfg
    for key in where:
        section = section[key]
    section[typo] = section.pop(good)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        jsonschema.validate(cfg, ray_schema())
    with pytest.raises(Exception, match=typo):  # Ray's own preparation and validation refuse it too
        prepared(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_head_starts_mlflow_on_the_private_network_with_allowed_hosts(name):
    args = head_mlflow_args(load_config(name))
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--host"] == "$HEAD_IP" and opts["--port"] == "5000"  # the private IP, never 0.0.0.0
    assert opts["--allowed-hosts"].split(",") == ["$HEAD_IP:5000", "localhost:5000", "127.0.0.1:5000"]
    assert opts["--backend-store-uri"].startswith("sqlite:////mnt/shared/")  # absolute, on shared storage
    assert opts["--artifacts-destination"].startswith("/mnt/shared/")
    head_ray = next(c for c in load_config(name)["head_start_ray_commands"] if "ray start" in c)
    assert "--head" in head_ray and "--node-ip-address=$(hostname -I | awk '{print $1}')" in head_ray


def head_mlflow_args(cfg: dict) -> list[str]:
    """The arguments of the `mlflow server` the head starts (cluster.yaml's head_start_ray_commands)."""
    return head_mlflow(cfg)[1]


def head_mlflow(cfg: dict) -> tuple[dict[str, str], list[str]]:
    """The environment settings and the arguments of the `mlflow server` the head starts."""
    (command,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    match = re.search(r"((?:\w+=\S+ )*)nohup mlflow server (.*?) <", command)
    assert match, command
    return dict(a.split("=", 1) for a in shlex.split(match.group(1))), shlex.split(match.group(2))


# ----------------------------------------------------------------------------------------------------------
# Two Ray nodes on this machine, a sweep across them, recorded in the head's MLflow server
# ----------------------------------------------------------------------------------------------------------

# Ray's state API, queried in a child process: Ray caches the auth token per process, and this one may hold
# another cluster's. Prints the cluster's nodes and the actors that ever ran on it.
STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = [dict(id=n.node_id, state=n.state, resources=n.resources_total) for n in list_nodes(address=address)]
actors = [dict(cls=a.class_name, repr=a.repr_name, node=a.node_id, pid=a.pid)
          for a in list_actors(address=address, detail=True, limit=10000)]
print(json.dumps(dict(nodes=nodes, actors=actors)))
"""


def cluster_state(dashboard: str, env: dict) -> dict | None:
    proc = subprocess.run(
        [sys.executable, "-c", STATE_QUERY, dashboard], env=env, capture_output=True, text=True, timeout=60
    )
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None


def ray_node(head_port: int, temp_dir: str, resources: dict, log: Path, env: dict, dashboard_port=None):
    """`ray start --block` (we hold its pid) with 1 CPU, a custom resource naming it and its own temp dir;
    every port explicit, as other Ray clusters may run on this machine."""
    ports = free_ports(7)
    cmd = [
        BIN / "ray",
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=100000000",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        "--disable-usage-stats",
    ]
    if dashboard_port:  # the head
        cmd += [
            "--head",
            f"--port={head_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={ports[6]}",
        ]
    else:
        cmd += [f"--address=127.0.0.1:{head_port}"]
    return start(cmd, log, env=env)


@pytest.mark.slow
def test_sweep_runs_on_a_two_node_ray_cluster_into_the_heads_mlflow_server(tmp_path, data_dir):
    # Ray's socket paths must stay short (~107 characters): its temp dirs live directly in /tmp.
    temps = [tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(3)]
    head_tmp, worker_tmp, secret = temps
    token = Path(secret) / "auth_token"
    token.write_text(secrets.token_hex(32))
    # Token auth on both nodes and the driver, as cluster.yaml sets it (the same mode everywhere, or the second
    # node is refused); Ray's gRPC servers listen on every interface, the token keeps strangers out.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "STBP_DATA_DIR": data_dir,
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port, mlflow_port = free_ports(3)
    dashboard = f"http://127.0.0.1:{dash_port}"
    shared = tmp_path / "shared"  # stands for /mnt/shared
    logs = [tmp_path / n for n in ("head.log", "worker.log", "mlflow.log", "tune.log")]
    procs: list[subprocess.Popen] = []
    try:
        head = ray_node(gcs_port, head_tmp, {"node_head": 1}, logs[0], env, dashboard_port=dash_port)
        procs.append(head)
        wait_for(lambda: port_open(gcs_port), 120, "the head's GCS", [head], 0.5, logs[:1])
        procs.append(ray_node(gcs_port, worker_tmp, {"node_worker": 1}, logs[1], env))

        # The MLflow server exactly as cluster.yaml's head starts it, 127.0.0.1 for the private IP.
        settings, args = head_mlflow(load_config("cluster.yaml"))
        args = [
            a.replace("$HEAD_IP", "127.0.0.1").replace(":5000", f":{mlflow_port}").replace("/mnt/shared", str(shared))
            for a in args
        ]
        args = [str(mlflow_port) if a == "5000" else a for a in args]
        (shared / "mlflow" / "artifacts").mkdir(parents=True)
        procs.append(start([BIN / "mlflow", "server", *args], logs[2], env={**env, **settings}))
        uri = f"http://127.0.0.1:{mlflow_port}"

        def two_nodes():
            state = cluster_state(dashboard, env)
            alive = [n for n in (state or {}).get("nodes", []) if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        nodes = wait_for(two_nodes, 180, "both Ray nodes", procs[:2], 0.5, logs[:2])
        by_role = {("head" if "node_head" in n["resources"] else "worker"): n["id"] for n in nodes}
        assert set(by_role) == {"head", "worker"}, nodes
        wait_for(lambda: mlflow_healthy(uri), 180, "the MLflow server", procs[2:], 0.5, logs[2:3])
        # Its allowed-hosts protection is on: a foreign Host header is refused, the allowed ones are served.
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api, host="attacker.example") == 403
        assert http_status(api, host=f"127.0.0.1:{mlflow_port}") == 200
        assert http_status(api, host=f"localhost:{mlflow_port}") == 200

        # The sweep, as `ray job submit` runs it on the head: joined to the cluster, trials writing to MLflow.
        # Two trials of one CPU each, two at once, one CPU per node: they must spread over both nodes.
        storage = shared / "ray_results"
        cmd = [
            sys.executable,
            REPO / "tune.py",
            "--sweep",
            REPO / "sweeps" / "smoke.yaml",
            "--address",
            f"127.0.0.1:{gcs_port}",
            "--tracking_uri",
            uri,
            "--storage",
            storage,
            "--num_samples",
            "2",
            "--train_size",
            "256",
            "--val_size",
            "128",
            "--test_size",
            "256",
        ]
        driver = start(cmd, logs[3], env=env, cwd=tmp_path)
        procs.append(driver)
        try:
            driver.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not finish in 7 minutes\n" + "\n".join(tail(x) for x in logs))
        assert driver.returncode == 0, "\n".join(tail(x) for x in logs)

        # Trials ran on both nodes (Ray's own record of the trial actors and where they lived).
        state = cluster_state(dashboard, env)
        assert state, "Ray's state API did not answer"
        # Tune's trial actors; Ray names their class "ImplicitFunc" or "wrap_function.<locals>.ImplicitFunc".
        trial_nodes = [a["node"] for a in state["actors"] if a["cls"].split(".")[-1] == "ImplicitFunc"]
        assert set(trial_nodes) == set(by_role.values()), (by_role, state["actors"])

        # Every trial is in MLflow: one child run per trial directory, under one finished parent run.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("stbp-smoke")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("stbp.role") == "sweep"]
        assert parent.info.status == "FINISHED" and parent.data.tags["trials"] == "2"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        trial_dirs = {p.name.removeprefix("trial_") for p in (storage / "smoke").glob("trial_*")}
        assert len(trial_dirs) == 2 and {r.data.tags["ray_trial_id"] for r in children} == trial_dirs
        for run in children:
            stopped = run.info.status == "KILLED" and run.data.tags.get("stopped_early") == "true"
            assert run.info.status == "FINISHED" or stopped, (run.info.status, run.data.tags)
            assert {"v_th", "aa"} <= set(run.data.params) and "val_acc" in run.data.metrics
        # Artifacts went through the server to its artifacts destination (shared storage).
        assert list((shared / "mlflow" / "artifacts").rglob("checkpoints/best.pt"))
    finally:
        for proc in reversed(procs):  # driver, MLflow, worker, head
            stop_session(proc)
        for d in temps:
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# torchrun across two "nodes"
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_nodes_train_as_one_job(tmp_path, data_dir):
    env = {**os.environ, "STBP_DATA_DIR": data_dir, "OMP_NUM_THREADS": "1"}
    port = free_port()
    out = tmp_path / "shared" / "out"  # one output_dir for both nodes, as on shared storage
    procs, logs = [], []
    try:
        for rank in (0, 1):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=stbp-two-nodes",
                "--local-addr=127.0.0.1",
                REPO / "train_ddp.py",
                "--preset",
                "tiny",
                "--output_dir",
                out,
                "--mlflow",
                "false",
                "--epochs",
                "1",
                "--train_size",
                "512",
                "--batch_size",
                "64",
            ]
            logs.append(tmp_path / f"node{rank}.log")
            procs.append(start(cmd, tmp_path / f"node{rank}.out", env=env, cwd=tmp_path, errors=logs[-1]))
        for proc in procs:
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                pytest.fail("torchrun did not finish in 5 minutes\n" + "\n".join(tail(x) for x in logs))
        outputs = [(tmp_path / f"node{r}.out").read_text() for r in (0, 1)]
        report = "\n".join(outputs) + "\n".join(tail(x) for x in logs)
        assert [p.returncode for p in procs] == [0, 0], report
    finally:
        for proc in procs:
            stop_session(proc)
    # One job: rank 0 (on whichever node the rendezvous made it) alone prints, and saw a world of 2.
    assert sum(o.count("epoch 1/1") for o in outputs) == 1, report
    assert sum("2 rank(s)" in o for o in outputs) == 1, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    assert {p.name for p in (out / "checkpoints").glob("*.pt")} >= {"last.pt", "best.pt"}
