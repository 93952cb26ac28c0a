"""Security of the public socket: CurveZMQ (a client with the server's public key is served, one
with a wrong key or none gets nothing at all), `gdsllm keygen`, and the refusal to bind a
non-loopback address without keys unless --insecure.
"""
from __future__ import annotations

import functools
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from conftest import concurrently
from gdsllm.commands.keygen import keygen
from gdsllm.config import ServiceConfig
from gdsllm.service.client import Client
from gdsllm.service.pipeline import LocalService
from service_helpers import N, PROMPTS, light_reference, model_dir, single_thread_workers  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread_workers")
needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CurveZMQ")


def _gets_nothing(endpoint, **keys) -> None:
    """A client with these keys gets no reply at all (its handshake fails: the server is silent)."""
    with Client(endpoint, timeout=2, **keys) as c, pytest.raises(TimeoutError):
        c.health()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_curve
def test_keygen_writes_a_private_secret_and_a_public_key(tmp_path):
    secret, public, key = keygen(tmp_path / "keys" / "srv")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(key) == 40 and key in public.read_text() and "secret-key" not in public.read_text()
    import zmq.auth
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert pub.decode() == key and sec is not None and zmq.auth.load_certificate(str(public))[1] is None
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "keys" / "srv")


@needs_curve
def test_curve_right_key_served_wrong_or_no_key_gets_nothing(model_dir, light_reference, tmp_path):
    secret, public, key = keygen(tmp_path / "srv")
    _, wrong, _ = keygen(tmp_path / "other")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = ServiceConfig(model=model_dir, endpoint=endpoint, curve_secret_key=secret, metrics_port=None)
    with LocalService(cfg, private_endpoint=False) as svc:
        with Client(svc.endpoint, timeout=30, server_key=public) as c:  # the .key file
            assert c.health().status == "ok"
            assert c.generate(PROMPTS[0], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[0]]
        concurrently(*(functools.partial(_gets_nothing, svc.endpoint, server_key=bad)
                       for bad in (wrong, None)))
        raw = zmq.Context.instance().socket(zmq.DEALER)  # a plain socket speaking msgpack
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(svc.endpoint)
        try:
            raw.send(b"\x82\xa4type\xa6health\xaarequest_id\xa1h", zmq.NOBLOCK)
        except zmq.Again:
            pass  # no connection to queue it on: the handshake already failed
        assert not raw.poll(1500), "an unauthenticated peer got a reply"
        raw.close()
        with Client(svc.endpoint, timeout=30, server_key=key) as c:  # the key itself
            assert c.health().status == "ok"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-m", "gdsllm", "generate", "--endpoint", svc.endpoint,
                              "--server-key", str(public), "-p", PROMPTS[0], "-n", "4", "--temp", "0"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_non_loopback_bind_needs_keys_or_insecure(model_dir, tmp_path):
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.10:5555", "tcp://eth0:5555"):
        with pytest.raises(ValueError, match="--insecure"):
            ServiceConfig(model=model_dir, endpoint=endpoint)
        ServiceConfig(model=model_dir, endpoint=endpoint, insecure=True)
        ServiceConfig(model=model_dir, endpoint=endpoint, curve_secret_key=tmp_path / "k.key_secret")
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "ipc:///tmp/x"):
        ServiceConfig(model=model_dir, endpoint=endpoint)


def test_serve_command_refuses_a_public_bind_without_keys(model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "gdsllm", "serve", "-m", str(model_dir), "--device", "cpu",
                          "--endpoint", "tcp://0.0.0.0:5555", "--metrics-port", "-1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--insecure" in out.stderr and "Traceback" not in out.stderr


@needs_curve
def test_curve_allow_list_serves_listed_client_keys_only(model_dir, tmp_path):
    """Issue 24, item 9: with --curve-allow (a certificate file or a directory of them) a client
    holding the server's public key but an unlisted key pair of its own gets nothing; the HTTP
    front end (which connects with the server's own pair) is served."""
    from ipc.sockets import load_secret_key
    from http_helpers import HttpServe, get
    secret, public, _ = keygen(tmp_path / "srv")
    (tmp_path / "allowed").mkdir()
    alice_secret, alice_public, _ = keygen(tmp_path / "allowed" / "alice")
    mallory_secret, _, _ = keygen(tmp_path / "mallory")
    alice, mallory = load_secret_key(alice_secret), load_secret_key(mallory_secret)
    # `gdsllm serve` starts meanwhile (a process of its own): checked after the two services here
    s = HttpServe(model_dir, tmp_path / "serve.log", "--curve-secret-key", str(secret),
                  "--curve-allow", str(tmp_path / "allowed"), wait=False)
    try:
        _allow_list_in_process(model_dir, secret, public, alice_public, tmp_path / "allowed", alice, mallory)
        s.wait_ready()
        assert get(s.url + "/health")[0] == 200
        with Client(s.endpoint, timeout=2, server_key=public, client_keys=mallory) as c, \
                pytest.raises(TimeoutError):
            c.health()
    finally:
        assert s.stop() == 0, s.log_tail()


def _allow_list_in_process(model_dir, secret, public, alice_public, allowed, alice, mallory):
    for allow in (alice_public, allowed):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        cfg = ServiceConfig(model=model_dir, endpoint=endpoint, curve_secret_key=secret,
                            curve_allow=allow, metrics_port=None)
        with LocalService(cfg, private_endpoint=False) as svc:
            with Client(svc.endpoint, timeout=30, server_key=public, client_keys=alice) as c:
                assert c.health().status == "ok", allow
            concurrently(*(functools.partial(_gets_nothing, svc.endpoint, server_key=public,
                                             client_keys=keys)
                           for keys in (mallory, None)))  # unlisted, or a fresh pair
    with pytest.raises(ValueError, match="needs --curve-secret-key"):
        ServiceConfig(model=model_dir, curve_allow=alice_public)
