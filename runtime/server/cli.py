"""The `serve` subcommand (registered by `runtime.cli`); fastapi and uvicorn load only here.

python -m runtime serve --engines engines/tiny-fp32 [--host 127.0.0.1] [--port 8000]
python -m runtime serve --engines engines/tiny-fp32 --ray-replicas 2   # Ray Serve
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from runtime import validate
from runtime.errors import UserError

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def require(modules, extra: str) -> None:
    """A one-line `UserError` naming the extra when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not installed; the server needs the {extra} extra: "
            f'pip install "blip3o-edge[{extra}]"'
        )


def add_parser(sub, common) -> None:
    s = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, help="rows per step call (default: graph limit)")
    s.add_argument("--max-running", type=int, help="requests stepped at once (default: batch)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--model-name", help="the served model id (default blip3o-VARIANT-PRECISION)")
    s.add_argument(
        "--max-steps",
        type=int,
        help="most DiT or decoder steps a request may ask for (default 1000): a 400 above it",
    )
    s.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let chat requests fetch http(s) image URLs",
    )
    s.add_argument(
        "--ray-replicas",
        type=int,
        help="serve with Ray Serve, N replicas (RAY_ADDRESS joins a cluster)",
    )
    s.add_argument("--ray-max-ongoing", type=int, default=8, help="max_ongoing_requests")
    s.add_argument("--ray-max-queued", type=int, default=64, help="max_queued_requests")
    s.add_argument(
        "--ray-autoscale",
        metavar="MIN:MAX",
        help="autoscaling between MIN and MAX replicas instead of a fixed number",
    )
    s.add_argument(
        "--ray-target-ongoing",
        type=float,
        default=2.0,
        help="autoscaling target_ongoing_requests per replica",
    )
    s.set_defaults(func=cmd_serve)

    from runtime.server.triton import add_parser as add_triton

    add_triton(sub)


def server_config(args):
    from runtime.params import MAX_STEPS
    from runtime.server.state import ServerConfig

    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, 1024)
    if args.max_steps is not None:
        validate.integer("--max-steps", args.max_steps, 1, MAX_STEPS)
    if not Path(args.engines).is_dir():
        raise UserError(f"--engines {args.engines}: no such folder")
    return ServerConfig(
        engines=Path(args.engines).resolve(),
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        max_batch=args.max_batch,
        max_running=args.max_running,
        max_queue=args.max_queue,
        allow_remote_images=args.allow_remote_images,
        model_name=args.model_name,
        max_steps=args.max_steps,
    )


def cmd_serve(args) -> int:
    require(SERVE_MODULES, "serve")
    validate.integer("--port", args.port, 0, 65535)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = server_config(args)
    if args.ray_replicas is not None or args.ray_autoscale or os.environ.get("RAY_ADDRESS"):
        require(("ray",), "ray")
        from runtime.server.ray_serve import RayOptions, serve_on_ray

        options = RayOptions.from_args(args)
        return serve_on_ray(config, options, host=args.host, port=args.port)
    import uvicorn

    from runtime.server.app import create_app

    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return 0
