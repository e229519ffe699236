"""`medq serve`: a run's model over HTTP — the Open Inference Protocol v2 (KServe / Triton / OpenVINO Model Server
REST), an images-in endpoint with `medq predict`'s exact preprocessing, dynamic batching, Prometheus metrics.

Building blocks for other front ends (Ray Serve, Docker): ``load_models(config, run_dirs)`` → verified, warmed-up
models; ``create_app(models, config.serve, token=...)`` → the FastAPI application.
"""
from medq.serve.app import ServerState, create_app
from medq.serve.server import load_models, run_serve

__all__ = ["ServerState", "create_app", "load_models", "run_serve"]
