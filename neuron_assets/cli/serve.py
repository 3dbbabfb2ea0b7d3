"""`neuron-assets serve`: the explorer, a web app and JSON API over the store (read-only)."""

from __future__ import annotations

import sys

from neuron_assets.cli.args import check_port
from neuron_assets.config import load_config


def register(commands) -> None:
    serve = commands.add_parser("serve", help="the explorer: search descriptions, open a feature's page (exemplars, "
                                "every score, effects, cluster), steer; a JSON API at /api (documented at /docs); "
                                "read-only over the store, safe beside a run that writes it")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--torch-threads", type=int, default=1, metavar="N",
                       help="threads per torch operation (default 1: the server encodes many short queries at once, "
                            "and more threads per query only wait on each other; raise it for faster steering on CPU)")
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn

    from neuron_assets.serve.app import create_app
    from neuron_assets.store import Store

    config = load_config(args.config)
    check_port(args.port, "serve")
    store = Store(config.store_root)
    if not store.has_data():
        raise LookupError(f"no data under {config.store_root}; run `neuron-assets run` first, then serve")
    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be at least 1, got {args.torch_threads}")
    import torch

    torch.set_num_threads(args.torch_threads)
    app = create_app(config, store)
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(f"explorer on http://{host}:{args.port}/ (API docs: /docs) over {config.store_root}; Ctrl-C stops it",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
