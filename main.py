"""The web front end: an upload page and a JSON API that classify a galaxy image.

    python main.py                                  # http://127.0.0.1:8000, checkpoints from .
    python main.py --models-dir runs --port 8080
    GALAXY10_MODELS_DIR=runs uvicorn main:app --workers 4 --host 0.0.0.0   # behind a proxy, 4 processes

`GET /` is the upload form, `POST /upload-file/` the result page, `POST /api/predict` the same prediction as
JSON, `GET /api/models` and `GET /healthz` what is served, `/docs` the OpenAPI page (docs/web.md).
`main.app` is the app for an ASGI server, made on first use from the environment variables that mirror the
flags (GALAXY10_MODELS_DIR, GALAXY10_MAX_UPLOAD_MB, GALAXY10_DEFAULT_MODEL); importing this module loads
nothing, and each server process loads its models when it starts. This script is the command line; the
app is galaxy10/web.py's.
"""
from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI

from galaxy10.errors import Galaxy10Error, run_cli
from galaxy10.registry import TRAIN_HINT
from galaxy10.web import SETTINGS, Settings, app_for, create_app, parse_setting

__all__ = ["create_app", "main"]  # and `app`, made on first use (below)


def __getattr__(name: str) -> Any:
    """`main.app`: the app the environment's settings describe, made once, when an ASGI server (uvicorn,
    gunicorn) first asks for it, so that importing main stays cheap and does nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = globals()["app"] = app_for(Settings.from_environment())
    return app


def port_number(text: str) -> int:
    """argparse type for --port: uvicorn would end a port outside 0-65535 in a traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535: choose a free one, e.g. 8080")
    return port


def check_port_free(host: str, port: int) -> None:
    """Fail now, not after minutes of `make demo` training, if HOST:PORT is taken.

    Binds the way uvicorn will, then lets go of the socket at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn does: a port left in TIME_WAIT by a server just stopped counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise Galaxy10Error(
                    f"{host}:{port} is already in use: stop what listens there or choose another port "
                    "(--port 8080, or `make demo PORT=8080`)"
                ) from None
            raise Galaxy10Error(
                f"cannot listen on {host}:{port} ({err.strerror or err}): pass another --host or --port"
            ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the galaxy upload page and JSON API with uvicorn.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    for name, setting in SETTINGS.items():  # the app's settings, each also an environment variable
        default, env = setting.default, setting.metadata["env"]
        shown = "" if default is None else f" (default: {default:g})" if isinstance(default, float) else \
            f" (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", default=default,
                            type=lambda text, name=name: parse_setting(name, text),
                            help=f"{setting.metadata['help']}{shown} (environment: {env})")
    parser.add_argument(
        "--check-port",
        action="store_true",
        help="only check that --host:--port is free, then exit (make demo does this before training)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check_port:
        check_port_free(args.host, args.port)
        return
    app: FastAPI = app_for(Settings(**{name: getattr(args, name) for name in SETTINGS}))
    names = [m.name for m in app.state.registry.models()]
    if args.default_model and args.default_model not in names:
        found = ", ".join(names) or "none"
        raise Galaxy10Error(f"no model {args.default_model!r} in {args.models_dir} (found: {found})")
    print(f"{len(names)} model(s) in {args.models_dir}: {', '.join(names) or TRAIN_HINT}")
    print(f"Serving the galaxy classifier on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(run_cli(main))
