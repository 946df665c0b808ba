"""bitsmith serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key K] [--max-batch B] [--max-queue N]

An OpenAI-compatible HTTP server (/v1/models, /v1/completions, /v1/chat/completions, /health) with
continuous batching; see :mod:`bitsmith.serve`."""

from __future__ import annotations

import argparse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 exposes the server to the network, use it with --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $BITSMITH_API_KEY when set, else no key)")
    p.add_argument("--name", default=None, help="the model id clients send (default: the model argument's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per step (default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for a slot; "
                   "more are answered 429 (default 32)")
    p.add_argument("--max-tokens-default", type=int, default=256,
                   help="new tokens for a request that sets no max_tokens (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens fed per step, shared by the prompts being prefilled, in the same forward as "
                   "the decoding sequences' next tokens: smaller keeps streams smoother while prompts arrive, larger "
                   "gives new requests their first token sooner (default 256)")
    p.add_argument("--draft", metavar="SPEC|PATH", default=None,
                   help="speculative decoding while one request is active: a spec (w2g64, w3g128) for a draft built "
                   "in memory from the model's unquantized source, or a quantized checkpoint of the same model")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per round (1-7, default 4)")
    p.add_argument("--draft-head", default="w4g128",
                   help="spec of a spec-built draft's output head (default w4g128; 'none' keeps it unquantized)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from bitsmith.cli.common import console
    from bitsmith.runtime.options import RuntimeOptions

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0 or args.max_tokens_default < 1 or args.prefill_chunk < 1:
        raise ValueError("--max-batch, --max-tokens-default and --prefill-chunk must be >= 1, --max-queue >= 0")
    try:  # before loading the model: a missing extra is the first thing to fix
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"bitsmith serve needs FastAPI and uvicorn ({exc.name} is not installed): "
                         "pip install 'bitsmith[serve]'") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("BITSMITH_API_KEY") or None
    if args.host not in LOCAL_HOSTS and not api_key:
        console.print(f"[yellow]warning: serving on {args.host} without --api-key: anyone who can reach this "
                      "address can use the model[/]")
    from bitsmith.infer.speculative import MAX_DRAFT_TOKENS
    from bitsmith.runtime.load import load_model
    from bitsmith.serve.server import ServeSettings, build_engine, run_foreground

    if args.draft is not None and not 1 <= args.draft_k <= MAX_DRAFT_TOKENS:  # before any loading
        raise ValueError(f"--draft-k must be 1 to {MAX_DRAFT_TOKENS}, got {args.draft_k}")
    options = RuntimeOptions.from_env()
    loaded = load_model(args.model, options=options)
    draft = None
    if args.draft is not None:
        from bitsmith.infer.draft import load_draft

        head = None if args.draft_head.lower() == "none" else args.draft_head
        built = load_draft(args.draft, loaded, options, head_spec=head)
        console.print(f"[dim]draft: {built.label} ({built.build_s:.1f} s)[/]")
        draft = built.model
    name = args.name or Path(str(args.model).rstrip("/")).name
    settings = ServeSettings(name, args.max_batch, args.max_queue, args.max_tokens_default, api_key, args.prefill_chunk,
                             args.draft_k)
    engine = build_engine(loaded.model, loaded.tokenizer, settings, options, draft)
    console.print(f"serving [bold]{name}[/] on http://{args.host}:{args.port}/v1 (context {engine.context:,}, "
                  f"batch {args.max_batch}, queue {args.max_queue}{', API key required' if api_key else ''})")
    run_foreground(engine, args.host, args.port, args.log_level)
    return 0
