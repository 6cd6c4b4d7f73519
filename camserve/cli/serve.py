"""``camserve serve`` / ``camserve stop``: the command-line face of :mod:`camserve.serving.torchserve.server`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from camserve.config import POST_PROCESSING, load_config
from camserve.serving.torchserve.server import start, stop


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "server": {
            "host": args.host,
            "inference_port": args.inference_port,
            "management_port": args.management_port,
            "metrics_port": args.metrics_port,
            "grpc_inference_port": args.grpc_inference_port,
            "grpc_management_port": args.grpc_management_port,
            "health_port": args.health_port,
            "batch_size": args.batch_size,
            "max_batch_delay_ms": args.max_batch_delay,
            "workers": args.workers,
            "token_auth": False if args.no_token_auth else None,
            "model_api": True if args.model_api else None,
        },
        "runtime": {"ort_threads": args.ort_threads, "post_processing": args.post_processing},
    }
    config = load_config(args.config, overrides=overrides)
    instance = start(
        config,
        run_dir=args.run_dir,
        model_store=args.model_store,
        models=args.models,
        inference_host=args.inference_host,
        config_file=args.config,
    )
    if args.inference_host and args.inference_host not in ("127.0.0.1", "localhost", "::1") and not config.server.token_auth:
        print(f"camserve: warning: the inference API on {args.inference_host} accepts requests without a token", file=sys.stderr)
    print(f"camserve: serving {', '.join(f'{n} {v}' for n, vs in instance.models.items() for v in vs if f'{n} {v}' not in instance.failed)}")
    for model, why in instance.failed.items():
        print(f"camserve: warning: model {model} did not load: {why} (TorchServe keeps retrying it; "
              f"see {instance.run_dir / 'logs' / 'model_log.log'})", file=sys.stderr)
    print(f"  inference  {instance.inference_url}\n  management {instance.management_url}\n  metrics    {instance.metrics_url}/metrics")
    print(f"  health     {instance.health_url}/ping and /ready (no token needed)")
    if instance.key("inference"):
        print(f"  tokens     {instance.run_dir / 'key_file.json'} (send 'Authorization: Bearer <key>')")
    print(f"  logs       {instance.run_dir / 'logs'}\n  stop with  camserve stop --run-dir {args.run_dir}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    print("camserve: stopped" if stop(args.run_dir) else "camserve: no server was running")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="start TorchServe with camserve models (safe defaults)")
    p.add_argument("--model-store", default="model_store", help="folder of .mar archives (default model_store)")
    p.add_argument("--models", default="all", help="comma-separated .mar names, or all (default)")
    p.add_argument("--run-dir", default="serve_run", help="instance folder: config, logs, keys, tmp (default serve_run)")
    p.add_argument("--config", help="camserve YAML/JSON configuration file (limits, server, runtime)")
    p.add_argument("--host", help="bind address of every API (default 127.0.0.1)")
    p.add_argument("--inference-host", help="bind address of the inference API only, e.g. 0.0.0.0 to open it")
    for name in ("inference", "management", "metrics", "grpc-inference", "grpc-management", "health"):
        p.add_argument(f"--{name}-port", type=int, help=f"{name} port (0 = a free one)")
    p.add_argument("--batch-size", type=int, help="server-side batch size")
    p.add_argument("--max-batch-delay", type=int, help="milliseconds to wait to fill a batch")
    p.add_argument("--workers", type=int, help="workers per model version")
    p.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads per worker (0 = cores / workers)")
    p.add_argument("--post-processing", choices=POST_PROCESSING,
                   help="where GradCAM-family maps are computed: numpy on the host, or an ONNX graph on the "
                        "graph's device (default auto: the device under CUDA)")
    p.add_argument("--no-token-auth", action="store_true", help="turn TorchServe token authorization off (all APIs)")
    p.add_argument("--model-api", action="store_true", help="enable model registration through the management API")
    p.set_defaults(func=_serve)
    q = subparsers.add_parser("stop", help="stop the TorchServe started by camserve serve")
    q.add_argument("--run-dir", default="serve_run")
    q.set_defaults(func=_stop)
