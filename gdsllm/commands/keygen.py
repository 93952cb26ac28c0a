"""`gdsllm keygen`: a CurveZMQ key pair for `gdsllm serve --curve-secret-key`.

    gdsllm keygen -o ~/.config/gdsllm/server    # writes server.key_secret (mode 0600) and server.key
    gdsllm serve --endpoint tcp://0.0.0.0:5555 --curve-secret-key ~/.config/gdsllm/server.key_secret
    Client("tcp://host:5555", server_key="~/.config/gdsllm/server.key")   # or the 40-character key

The files are ZeroMQ certificates (`zmq.auth.load_certificate` reads them). The secret one never
leaves the server; clients need only the public key, printed here too.

A server may also list the clients it serves (`serve --curve-allow DIR`): each client makes its own
pair the same way and hands over only its `.key`, which goes into DIR:

    gdsllm keygen -o alice                       # on the client: alice.key_secret stays there
    cp alice.key /etc/gdsllm/clients/            # on the server: --curve-allow /etc/gdsllm/clients
    Client("tcp://host:5555", server_key="server.key", client_keys=load_secret_key("alice.key_secret"))
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("keygen", help="make a CurveZMQ key pair for `serve --curve-secret-key`")
    p.add_argument("-o", "--output", default="gdsllm-server", metavar="PATH",
                   help="path without extension: writes PATH.key_secret and PATH.key "
                        "(default ./gdsllm-server)")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=run)


def keygen(output: str | os.PathLike, force: bool = False) -> tuple[Path, Path, str]:
    """Write OUTPUT.key_secret (0600) and OUTPUT.key; returns both paths and the public key."""
    import zmq
    out = Path(output).expanduser()
    secret_path, public_path = Path(f"{out}.key_secret"), Path(f"{out}.key")
    for path in (secret_path, public_path):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    if not zmq.has("curve"):
        raise ValueError("this pyzmq/libzmq has no CurveZMQ support (built without libsodium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    head = "#   ZeroMQ CURVE {} certificate, made by `gdsllm keygen`\n"
    pub_text = f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # also when --force rewrote a wider file
        f.write(head.format("**Secret**") + pub_text + f"    secret-key = \"{secret.decode()}\"\n")
    public_path.write_text(head.format("Public") + pub_text)
    return secret_path, public_path, public.decode()


def run(args) -> int:
    secret_path, public_path, public = keygen(args.output, args.force)
    print(f"secret key: {secret_path} (keep it on the server: --curve-secret-key)")
    print(f"public key: {public_path}")
    print(f"server public key for clients: {public}")
    sys.stdout.flush()
    return 0
