"""What the tests of servers run by `medq serve` share: a tiny trained run to serve, a free loopback port, and the
wait for a server's readiness. A helper module, not a test file."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests


def tiny_run(root: Path) -> Path:
    """A 32-px refkit-cnn trained one epoch on phantom radiographs and frozen (model_fp32.pb): the run folder."""
    from medq.config import load_config
    from medq.data.phantoms import generate_chest_pneumonia
    from medq.freeze import run_freeze
    from medq.train import run_train

    generate_chest_pneumonia(root / "data", n_train=40, n_val=4, n_test=16, size=48, seed=1)
    config = load_config(None, [f"run.output_dir={root / 'output'}", f"data.root={root / 'data'}", "run.name=tiny",
                                "data.generate=false", "preprocess.image_size=32", "train.epochs=1",
                                "model.params={blocks: 2, filters: 4, dense_units: 8}"])
    run_train(config)
    run_freeze(config)
    return Path(config.run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, limit_s: float = 300, verify: str | bool = True) -> None:
    """Poll GET /v2/health/ready until 200; the limit only stops a hung start, it asserts nothing about speed. The
    server's output goes to the file LOG (a pipe nobody reads would stop a server that logs every request)."""
    deadline = time.monotonic() + limit_s
    while True:
        assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=5, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.5)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the cryptography library."""
    import datetime

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
