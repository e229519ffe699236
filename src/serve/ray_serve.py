"""`medq serve --ray ADDRESS --replicas N`: the same application (:func:`medq.serve.create_app`) as a Ray Serve
deployment, its replicas spread over the machines of a Ray cluster (the optional `serve-ray` extra).

Each replica is a Ray actor that loads, verifies (sha256, staleness) and warms up the runs' models itself, then builds
the app with its own dynamic batcher, queue and metrics: the run folders must be at the same path on every node
(shared storage), and a node whose copy differs refuses to start its replica. Nothing but the config and the folder
names travels through Ray. Ray's HTTP proxy, on the head node only, listens on serve.host:serve.port (TLS from
serve.tls_cert/tls_key) and routes each request to a replica; a replica that dies is restarted by Ray Serve's
controller while the others keep answering. Overload is refused with 503 by Ray's router (max_queued_requests) as it
is by the app's queue. For autoscaling and other deployment options use `serve run` with a config file
(configs/ray/serve.yaml), whose import path is :func:`app_builder`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

from medq.errors import ConfigError, MedqError, first_line

log = logging.getLogger("medq")

APP_NAME = "medq"
DEPLOYMENT = "MedqServer"


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MedqError("--ray needs Ray Serve, an optional extra: `env/setup.sh serve-ray` (or pip install -r "
                        "env/requirements-serve-ray.txt)") from None
    return ray, serve


def deployment(config: Any, run_dirs: Sequence[str | Path], replicas: int | None = None) -> Any:
    """The bound Ray Serve application: REPLICAS replicas of the medq app over RUN_DIRS (None: Ray's default or the
    serve config file's num_replicas / autoscaling_config). Each run is read here first, so that a wrong folder is
    one line now rather than a replica failing on every node."""
    from medq.inference import read_run

    _, serve = _import_ray()
    settings = config.serve
    for run_dir in run_dirs:
        read_run(run_dir)
    options = {} if replicas is None else {"num_replicas": replicas}

    @serve.deployment(name=DEPLOYMENT, **options,
                      # the app's own batcher makes the batches: give it as many requests as its queue holds, and
                      # let Ray's router refuse (503) what no replica can take
                      max_ongoing_requests=settings.max_queue_size, max_queued_requests=settings.max_queue_size,
                      graceful_shutdown_timeout_s=settings.drain_timeout_s,
                      # Ray places replicas by the CPUs they reserve: as many as TensorFlow's threads use
                      ray_actor_options={"num_cpus": max(1, config.runtime.intra_op_threads)})
    @serve.ingress()
    class MedqServer:
        def __init__(self, config: Any, run_dirs: list[str]):
            self.config, self.run_dirs, self.models = config, run_dirs, []

        def __serve_build_asgi_app__(self):  # in the replica, after __init__: models are loaded here, never shipped
            from medq.hwinfo import thread_environment

            for key, value in thread_environment(self.config.runtime).items():
                os.environ.setdefault(key, value)  # before TensorFlow starts in this process
            from medq.serve.app import create_app
            from medq.serve.server import load_models, read_token

            self.models = load_models(self.config, self.run_dirs)
            return create_app(self.models, self.config.serve, token=read_token(self.config.serve.token_file))

        def check_health(self) -> None:  # Ray Serve calls this periodically; raising restarts the replica
            unready = [m.name for m in self.models if not m.ready]
            if unready:
                raise RuntimeError(f"models not ready: {unready}")

    return MedqServer.bind(config, [str(Path(r).resolve()) for r in run_dirs])


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run` entry point: args `config` (a medq config file), `set` (overrides, as --set takes them) and
    `runs` (run names or folders; default serve.runs). Replicas, autoscaling and the replicas' CPUs come from the
    serve config file's `deployments` section (configs/ray/serve.yaml)."""
    from medq.config import load_config
    from medq.runs import resolve_run
    from medq.serve.server import check_settings

    config = load_config(args.get("config"), list(args.get("set") or []))
    if args.get("runs"):
        config.serve.runs = list(args["runs"])
    check_settings(config.serve)
    return deployment(config, [resolve_run(r, config) for r in config.serve.runs])


def run_ray_serve(config: Any, run_dirs: Sequence[str | Path], *, address: str, replicas: int) -> int:
    """Deploy on the Ray cluster at ADDRESS, serve until SIGTERM/Ctrl-C, then remove the deployment."""
    from medq.serve.server import check_settings, read_token

    settings = config.serve
    check_settings(settings)
    read_token(settings.token_file)  # refused here, before any replica starts, when unreadable or empty
    if replicas < 1:
        raise ConfigError(f"--replicas {replicas}: must be 1 or more")
    ray, serve = _import_ray()
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MedqError(f"--ray {address}: no Ray cluster there ({first_line(exc)}); start one with `ray start "
                        "--head` and give its address (host:6379)") from None
    stop = threading.Event()
    originals = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port, "location": "HeadOnly",
                                  "ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key})
        try:
            serve.run(deployment(config, run_dirs, replicas), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica that cannot load its models fails the deployment
            raise MedqError(f"Ray Serve could not start the replicas ({first_line(exc)}); the replica logs are "
                            "under the cluster's session folder (/tmp/ray/session_latest/logs/serve/)") from None
        scheme = "https" if settings.tls_cert else "http"
        log.info("serve: %s on %s://%s:%d through Ray Serve at %s, %d replicas", ", ".join(Path(r).name for r in
                 run_dirs), scheme, settings.host, settings.port, address, replicas)
        stop.wait()
        log.info("serve: stopping: removing the %s application from the Ray cluster", APP_NAME)
        serve.delete(APP_NAME)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
