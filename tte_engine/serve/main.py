"""`tte-serve`: load a checkpoint, then serve it with uvicorn until SIGINT/SIGTERM.

On SIGINT/SIGTERM uvicorn stops accepting connections and lets in-flight requests finish (up to
--graceful-timeout seconds); then the engine loop drains and the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import TTEError


def build_parser() -> argparse.ArgumentParser:
    from ..cli import add_engine_flags, device_name, existing_dir, nonnegative_float, nonnegative_int, positive_int

    p = argparse.ArgumentParser(prog="tte-serve", description="OpenAI-compatible Think-Then-Embed embeddings server.")
    p.add_argument("--checkpoint", help="checkpoint directory, engine directory or alias (default: tiny-random, a random test "
                   "checkpoint whose vectors mean nothing; left to this default, a warning says so)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: one the system picks, logged)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health and /metrics "
                                     "(default: $TTE_API_KEY, else open)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model name in responses and /v1/models, then other names requests may use (default: the checkpoint's "
                        "directory name; that and the --checkpoint argument are always accepted; other names get 404)")
    p.add_argument("--max-batch-size", type=positive_int, help="sequences the engine runs together (default: the engine's max_num_seqs, 256)")
    p.add_argument("--max-queue", type=nonnegative_int, default=1024, help="items waiting beyond the batch before requests get 429 (default 1024)")
    p.add_argument("--max-body-bytes", type=positive_int, default=32 << 20, help="larger request bodies get 413 (default 32 MiB)")
    p.add_argument("--max-trace-tokens", type=nonnegative_int, help="largest max_trace_tokens a request may ask for, above it 400; also caps the budget of requests that "
                   "give none (default: the checkpoint's budget)")
    p.add_argument("--max-image-pixels", type=positive_int, default=1 << 25, help="larger images get 400 before they are decoded (default 33554432)")
    p.add_argument("--max-media-bytes", type=nonnegative_int, default=4 << 30,
                   help="bytes of preprocessed images and videos all requests in flight may hold together; a request that "
                        "would pass it gets 429, or 413 / 400 when its own items alone do (default 4 GiB)")
    p.add_argument("--limit-mm-per-prompt", type=json_value, metavar="JSON",
                   help='most images and videos per item, e.g. \'{"image": 8, "video": 1}\' (the default); more get 400')
    p.add_argument("--allow-local-files", nargs="?", type=existing_dir, const=Path("/"), metavar="DIR",
                   help="accept image and video paths (under DIR, an existing directory; default anywhere) besides data: URLs")
    p.add_argument("--cache", nargs="?", const="", metavar="PATH",
                   help="re-use traces and embeddings from a SQLite cache ($TTE_HOME/cache.sqlite if PATH is left out)")
    p.add_argument("--think", choices=["on", "off"], help="default for requests that do not say (default: on when the checkpoint has a trace budget and --max-trace-tokens is not 0)")
    p.add_argument("--device", type=device_name, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto: float32 on CPU; on CUDA bfloat16, or the checkpoint's float16)")
    p.add_argument("--max-model-len", type=positive_int, help="longest prompt + trace + suffix, in tokens")
    add_engine_flags(p)
    p.add_argument("--prep-threads", type=positive_int, default=4, help="threads that validate requests and decode images (default 4)")
    p.add_argument("--graceful-timeout", type=nonnegative_float, default=60.0,
                   help="seconds to let in-flight requests finish on shutdown, >= 0 (default 60)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server and engine log level (default info)")
    return p


def port_number(text: str) -> int:
    """argparse type: a TCP port number, 0-65535."""
    from ..cli import int_within

    return int_within(text, 0, 65535, "a port number, 0-65535")


def json_value(text: str):
    """argparse type: a JSON document."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be JSON, e.g. '{{\"image\": 4}}', got {text!r} ({exc})") from None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening, as uvicorn would bind it; raises OSError naming
    the address when it cannot be (a port in use: found before the model loads, not after)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc})") from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.checkpoint is None:
        args.checkpoint = "tiny-random"
        logging.getLogger("tte_engine").warning("no --checkpoint given: serving tiny-random, a random test checkpoint (its vectors mean nothing)")
    try:
        import uvicorn

        from .app import ServerSettings, create_app
    except ImportError as exc:
        print(f"tte-serve: error: {exc.name} is missing; pip install fastapi uvicorn httpx prometheus-client (the [serve] extra: pip install -e '.[serve]' in a checkout)", file=sys.stderr)
        return 2
    import torch

    from ..engine import Engine
    from ..result_cache import ResultCache

    from ..cli import engine_switches
    from .protocol import DEFAULT_MM_LIMITS

    limits = args.limit_mm_per_prompt
    if limits is not None and (not isinstance(limits, dict) or set(limits) - set(DEFAULT_MM_LIMITS)
                               or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in limits.values())):
        print(f"tte-serve: error: --limit-mm-per-prompt takes a JSON object with keys {sorted(DEFAULT_MM_LIMITS)} and "
              f"integer values >= 0, got {json.dumps(limits)}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("max_num_seqs", args.max_batch_size), ("max_model_len", args.max_model_len)) if v is not None}
    overrides.update(engine_switches(args))
    cache = listener = None
    try:  # the cache and the port first: an unusable cache file or a taken port is reported before the model loads
        cache = ResultCache(args.cache or None) if args.cache is not None else None
        listener = _listen(args.host, args.port)
        engine = Engine(args.checkpoint, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=args.dtype, **overrides)
    except (TTEError, OSError, ValueError) as exc:
        for held in (cache, listener):
            if held is not None:
                held.close()
        print(f"tte-serve: error: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        model_name=args.served_model_name[0] if args.served_model_name else None,
        model_aliases=(*(args.served_model_name or [])[1:], args.checkpoint),
        max_trace_tokens=args.max_trace_tokens,
        max_image_pixels=args.max_image_pixels,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        max_media_bytes=args.max_media_bytes,
        api_key=args.api_key or os.environ.get("TTE_API_KEY") or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        local_files_root=Path(args.allow_local_files).resolve() if args.allow_local_files is not None else None,
        prep_threads=args.prep_threads,
        think=None if args.think is None else args.think == "on",
    )
    app = create_app(engine, settings, cache)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout)
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its graceful shutdown: end with 0 instead
        signal.signal(sig, lambda *_: None)
    host, port = listener.getsockname()[:2]
    # uvicorn says where it listens only when it binds the socket itself
    logging.getLogger("tte_engine").info("tte-serve listening on http://%s:%d (Ctrl+C to quit)", f"[{host}]" if ":" in host else host, port)
    uvicorn.Server(config).run(sockets=[listener])
    logging.getLogger("tte_engine").info("tte-serve stopped")
    if cache is not None:
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
