"""`medq serve`: check the settings, load and warm up every run's model, then serve until SIGTERM or Ctrl-C.

The first SIGTERM/SIGINT drains: readiness and new inference requests answer 503, requests already in flight finish
(up to serve.drain_timeout_s), then the server exits 0. A second signal stops at once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import uvicorn

from medq.errors import ConfigError, MedqError, first_line
from medq.hwinfo import intra_op_threads, thread_settings_in_force
from medq.serve.app import ServerState, create_app
from medq.serve.models import MAX_BATCH_SIZE, ServedModel, load_model, warmup_images

log = logging.getLogger("medq")


def check_settings(settings: Any) -> None:
    """One-line errors for serve settings the config's own checks cannot see."""
    if not settings.runs:
        raise ConfigError("serve.runs: no run to serve; pass --run NAME (repeatable) or list them in serve.runs")
    if settings.threshold is not None and not 0.0 < settings.threshold < 1.0:
        raise ConfigError(f"serve.threshold {settings.threshold}: must be between 0 and 1")
    for key in ("max_queue_delay_ms", "request_timeout_ms", "max_body_mb", "drain_timeout_s"):
        if not math.isfinite(getattr(settings, key)):  # YAML's .nan and .inf slip past "greater than 0"
            raise ConfigError(f"serve.{key} {getattr(settings, key)}: must be a finite number")
    if settings.max_queue_delay_ms < 0:
        raise ConfigError(f"serve.max_queue_delay_ms {settings.max_queue_delay_ms}: must be 0 or more")
    if settings.max_queue_delay_ms >= settings.request_timeout_ms:
        raise ConfigError(f"serve.max_queue_delay_ms {settings.max_queue_delay_ms:g} is not below "
                          f"serve.request_timeout_ms {settings.request_timeout_ms:g}: a lone request would wait for "
                          "company past its own deadline and get 504; lower the delay or raise the timeout")
    if settings.decode_threads < 0:
        raise ConfigError(f"serve.decode_threads {settings.decode_threads}: must be 0 (one per physical core) or more")
    if settings.max_batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"serve.max_batch_size {settings.max_batch_size}: above {MAX_BATCH_SIZE}; the warm-up before "
                          f"ready would run {warmup_images(settings.max_batch_size)} images (a batch of every size); "
                          f"set {MAX_BATCH_SIZE} or less (the benchmark's batch sweep shows where img/s stops growing)")
    if settings.max_queue_size < settings.max_batch_size:
        raise ConfigError(f"serve.max_queue_size {settings.max_queue_size} is below serve.max_batch_size "
                          f"{settings.max_batch_size}: a full batch could never queue; raise max_queue_size")
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"serve.port {settings.port}: must be 0-65535")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("serve.tls_cert and serve.tls_key go together: pass both --tls-cert and --tls-key")
    for key in ("tls_cert", "tls_key", "token_file"):
        value = getattr(settings, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{value}: serve.{key} file not found")
    if settings.tls_cert is not None:
        check_tls(settings.tls_cert, settings.tls_key)


def check_tls(cert: str, key: str) -> None:
    """The certificate and key load as the server will load them, before any model is: a wrong pair is one line, not
    a traceback after minutes of warm-up, and an encrypted key never makes OpenSSL prompt for a pass phrase."""
    asked = []

    def password() -> bytes:
        asked.append(True)
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=password)
    except (ssl.SSLError, OSError) as exc:
        why = ("the key is encrypted; give an unencrypted key (`openssl pkey -in KEY -out plain.pem`), readable only "
               "by the server's user" if asked else
               "the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else
               f"not a PEM certificate and its private key ({first_line(exc)})")
        raise ConfigError(f"serve.tls_cert {cert}, serve.tls_key {key}: {why}") from None


def check_listen(host: str, port: int) -> None:
    """Bind every address the host resolves to (as asyncio's server will, SO_REUSEADDR) before the models load: a
    port in use or an address not this machine's is one line at once, not after the warm-up."""
    if port == 0:
        return
    try:
        with contextlib.ExitStack() as held:
            for family, kind, proto, _, address in set(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                          flags=socket.AI_PASSIVE)):
                probe = held.enter_context(socket.socket(family, kind, proto))
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio binds it: IPv6 only, the IPv4 address apart
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise MedqError(f"{host}:{port}: the server cannot listen there ({exc.strerror or first_line(exc)}); "
                        "choose another --port, or --host an address of this machine") from None


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (one line); refused when empty, warned about when others may read it."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: the token file cannot be read ({type(exc).__name__}); pass a readable UTF-8 "
                          "file holding the token") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{path}: the token file must hold one token (no spaces); e.g. "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > token`")
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("serve: %s is readable by other users; `chmod 600 %s`", path, path)
    return token


def load_models(config: Any, run_dirs: Sequence[str | Path]) -> list[ServedModel]:
    """Every run's model, verified and warmed up; on any failure the ones loaded are closed again."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) != len(names):
        raise ConfigError(f"serve.runs: two runs named {sorted(n for n in names if names.count(n) > 1)[0]!r}; a "
                          "model is named by its run folder, so serve runs with different names")
    models: list[ServedModel] = []
    try:
        for run_dir in run_dirs:
            models.append(load_model(run_dir, config.serve.model, engine_name=config.serve.engine,
                                     threshold=config.serve.threshold,
                                     max_megapixels=config.data.max_megapixels,
                                     warmup_batch=config.serve.max_batch_size,
                                     # the benchmark's threads: its rows and the server's are the same runtime
                                     intra_op_threads=intra_op_threads(config.runtime),
                                     inter_op_threads=config.runtime.inter_op_threads))
    except BaseException:
        close_models(models)
        raise
    return models


def close_models(models: Sequence[ServedModel]) -> None:
    for m in models:
        m.engine.close()


def run_serve(config: Any, run_dirs: Sequence[str | Path]) -> int:
    settings = config.serve
    check_settings(settings)
    token = read_token(settings.token_file)
    check_listen(settings.host, settings.port)
    log.info("serve: thread settings in force %s (engine: intra_op_threads=%s, inter_op_threads=%s)",
             {k: v for k, v in thread_settings_in_force().items() if v is not None},
             intra_op_threads(config.runtime), config.runtime.inter_op_threads)
    models = load_models(config, run_dirs)
    # requests and connections at once (each may hold a body up to max_body_mb): a running batch and a full queue per
    # model, and 32 more; beyond, 503 + Retry-After as JSON (uvicorn's own limit_concurrency answers plain text)
    state = ServerState(limit=len(models) * (settings.max_queue_size + settings.max_batch_size) + 32)
    try:
        app = create_app(models, settings, token=token, state=state)
        uv = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key, server_header=False,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
        server = DrainingServer(uv, state, settings.drain_timeout_s)
        scheme = "https" if settings.tls_cert else "http"
        log.info("serve: %s on %s://%s:%d (batches ≤ %d images, ≤ %g ms wait, queue ≤ %d images%s)",
                 ", ".join(m.name for m in models), scheme, settings.host, settings.port, settings.max_batch_size,
                 settings.max_queue_delay_ms, settings.max_queue_size, ", bearer token required" if token else "")
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise MedqError(f"{settings.host}:{settings.port}: the server could not listen there (in use, or not "
                            "this machine's address); choose another --port/--host")
    finally:
        close_models(models)
    log.info("serve: stopped")
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on the first signal instead of an immediate close."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        state.connections = lambda: len(self.server_state.connections)
        self._drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own handler closes the listener at once and re-raises the signal after shutdown (the process
        # would die by SIGTERM instead of exiting 0); this one drains first.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self.state.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        log.info("serve: %s: draining (new requests get 503; %d in flight)", signal.Signals(sig).name,
                 self.state.in_flight)
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and (self.state.idle() or time.monotonic() > self._drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)
