"""`medq serve --ray ADDRESS --replicas 2` on a two-node Ray cluster on loopback (two `ray start` processes, one CPU
each, dashboard off, small object stores): each node runs one replica; one replica's process is killed while requests
flow, the other keeps answering, and Ray Serve brings the killed one back. Served over HTTPS with a bearer token, as
a single `medq serve` is. Slow: each replica imports TensorFlow."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import served_run

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

from medq.errors import MedqError  # noqa: E402
from medq.loadtest import (CONNECTION_ERROR, Schedule, answers_alone, get_json, loopback_target,  # noqa: E402
                           run_level, tensor_payloads)

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")
LIMIT_S = 300  # stops a hung cluster or replica; asserts nothing about speed


def _ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """One node: `ray start --block`, small and quiet, its own ports (two nodes share this host)."""
    ports = [served_run.free_port() for _ in range(4)]
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
         "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
         "--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
         "--runtime-env-agent-port", str(ports[2]), "--metrics-export-port", str(ports[3]), *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _replicas(node: subprocess.Popen) -> list[int]:
    """Pids of the Serve replica processes under one node's `ray start`."""
    try:
        children = psutil.Process(node.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if child.name().startswith("ray::ServeRepl") or "ServeReplica" in " ".join(child.cmdline()[:1]):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait(condition, what: str):
    deadline = time.monotonic() + LIMIT_S
    while not (found := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)
    return found


def _stop(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM (Ray drains), then SIGKILL whatever of this process's own tree is left."""
    if process.poll() is None:
        tree = [process.pid] + [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    run_dir = served_run.tiny_run(root)
    temp = Path(f"/tmp/medq-ray-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "TF_"))} | {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    gcs = served_run.free_port()
    head = _ray_start(["--head", "--port", str(gcs), "--include-dashboard", "false",
                       "--dashboard-port", str(served_run.free_port()),
                       "--ray-client-server-port", str(served_run.free_port()), "--temp-dir", str(temp)],
                      root / "head.log", env)
    nodes = [head]
    try:
        time.sleep(5)
        assert head.poll() is None, (root / "head.log").read_text()[-3000:]
        worker = _ray_start(["--address", f"127.0.0.1:{gcs}"], root / "worker.log", env)
        nodes.append(worker)
        port = served_run.free_port()
        log = root / "serve.log"
        cert, key = served_run.self_signed(root)  # the deployment as a hospital runs it: HTTPS and a bearer token
        token = root / "token"
        token.write_text("ray-Q7-token\n")
        token.chmod(0o600)
        server = subprocess.Popen(
            [sys.executable, "-m", "medq", "serve", "--ray", f"127.0.0.1:{gcs}", "--replicas", "2", "--run",
             str(run_dir), "--model", "fp32", "--port", str(port), "--set", "runtime.intra_op_threads=1",
             "--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token)],
            cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        nodes.append(server)
        url = f"https://127.0.0.1:{port}"
        served_run.wait_ready(url, server, log, LIMIT_S, verify=str(cert))
        yield loopback_target(url, "tiny", token, cert), f"127.0.0.1:{gcs}", head, worker
    finally:
        for process in reversed(nodes):  # the deployment first, then the worker node, then the head
            _stop(process)
        shutil.rmtree(temp, ignore_errors=True)


def _running_replicas(gcs: str) -> int:
    """Ray Serve's own count of RUNNING replicas of the medq deployment (asked from a separate driver process)."""
    code = ("import ray; from ray import serve; ray.init(address=%r, logging_level='ERROR'); "
            "print(serve.status().applications['medq'].deployments['MedqServer'].replica_states.get('RUNNING', 0))"
            % gcs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else -1


def test_two_replicas_one_killed_requests_keep_being_answered_and_it_comes_back(cluster):
    target, gcs, head, worker = cluster
    (on_head,) = _wait(lambda: _replicas(head), "the head node's replica")
    (doomed,) = _wait(lambda: _replicas(worker), "the worker node's replica")  # replicas spread over both nodes
    _wait(lambda: _running_replicas(gcs) == 2, "both replicas RUNNING")
    with pytest.raises(MedqError, match="401"):  # the replicas ask for the token like a single server
        get_json(dataclasses.replace(target, token=None), "/v2/models/tiny")
    goods = tensor_payloads(target, get_json(target, "/v2/models/tiny"), 4, seed=0)
    alone = answers_alone(target, goods, 60)

    def load_until(condition):
        """Two clients in a closed loop until CONDITION() holds: (its value, answers by status, wrong answers)."""
        schedule = Schedule(goods, [], 0.0, 10**6, LIMIT_S)
        done = {}
        thread = threading.Thread(target=lambda: done.update(result=run_level(target, 2, schedule, alone, 1e-5, 60)))
        thread.start()
        try:
            found = _wait(condition, "the cluster's change")
        finally:
            schedule.requests = 0  # no new requests; those in flight finish
            thread.join()
        outcomes, _ = done["result"]
        return found, Counter(o.status for o in outcomes), sum(o.same is False for o in outcomes)

    os.kill(doomed, signal.SIGKILL)
    back, during, wrong = load_until(lambda: [p for p in _replicas(worker) if p != doomed])
    assert during[CONNECTION_ERROR] == 0 and wrong == 0 and during["200"] >= 1, during
    # the requests the killed replica held when it died may fail (at most one per client); all others are answered
    assert sum(n for s, n in during.items() if s != "200") <= 2, during
    assert _replicas(head) == [on_head], "the head node's replica was left alone"
    _wait(lambda: _running_replicas(gcs) == 2, "Ray Serve's second RUNNING replica")
    _, after, wrong = load_until(lambda: time.sleep(3) or True)
    assert set(after) == {"200"} and wrong == 0, after
    assert _replicas(worker) == back
