"""bitsmith probe URL --reference MODEL [--text FILE ...] [--api-key K] [--json]: how far an OpenAI-compatible
endpoint is from a reference model run here, and which quantization level of it the endpoint behaves like."""

from __future__ import annotations

import argparse

from bitsmith.cli.textargs import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="measure an OpenAI-compatible endpoint against a reference model and place it on the "
                                     "reference's quantization ladder")
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8080 (its /v1/completions must return logprobs)")
    p.add_argument("--reference", required=True, help="the unquantized model the endpoint should be serving (alias, "
                                                       "Hugging Face folder or GGUF file)")
    p.add_argument("--text", action="append", metavar="FILE", default=None,
                   help="held-out text to probe on: prose, code (the defaults, both), a file, or NAME=PATH; repeatable")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="model name to request (default: the first the server lists)")
    p.add_argument("--positions", type=positive_int, default=256, help="predictions per text (default 256)")
    p.add_argument("--topk", type=positive_int, default=20,
                   help="log-probs asked per position (default 20, OpenAI's usual maximum); KL is a lower bound at any k < vocab")
    p.add_argument("--mode", choices=("auto", "echo", "stepwise"), default="auto",
                   help="echo: one request per text (prompt logprobs); stepwise: one request per position "
                        "(llama-server); auto: echo when the server supports it")
    p.add_argument("--ladder-method", choices=("hqq", "rtn", "rtn-clip"), default="hqq",
                   help="how the reference's rungs are quantized: hqq (default, the best calibration-free method "
                        "measured; ~1 s per million weights and rung, once per reference: cached), rtn (plain "
                        "min-max, fastest, weaker rungs), rtn-clip (RTN with its clip search)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=run)


def _print_report(data: dict) -> None:
    from bitsmith.cli.common import out

    out.print(f"endpoint {data['url']} (model {data['model']}), reference {data['reference']}; "
              f"{data['mode']}, top-{data['k']}")
    rungs = list(data["overall"]["ladder"])
    out.print(f"{'text':<10} {'positions':>9} {'KL≥':>9} {'top-1':>7} {'bits':>5}  " + " ".join(f"{r:>9}" for r in rungs))
    for name, g in [*data["domains"].items(), ("all", data["overall"])]:
        ladder = " ".join(f"{g['ladder'][r]['kl']:>9.4g}" for r in rungs)
        out.print(f"{name:<10} {g['positions']:>9} {g['kl']:>9.4g} {g['top1']:>7.1%} {g['bits']:>5.1f}  {ladder}")
    out.print(f"[dim]KL≥: {data['kl_note']}; the rung columns are the reference's own {data['ladder_method']} ladder "
              "on the same positions, bits: " + ", ".join(f"{r} {data['overall']['ladder'][r]['bits']:.2f}" for r in rungs)
              + " bits per weight[/]")
    t = data["timing_s"]
    out.print(f"[dim]endpoint {t['endpoint_s']:.1f} s ({int(t['requests'])} requests), reference {t['reference_s']:.1f} s, "
              f"ladder {t['ladder_s']:.1f} s{' (cached)' if t['ladder_cached'] else ''}[/]")
    out.print(f"verdict: {data['verdict']}")


def run(args: argparse.Namespace) -> int:
    import json

    from bitsmith.cli.common import console, progress_bar
    from bitsmith.probe.run import ProbeConfig, probe

    config = ProbeConfig(url=args.url, reference=args.reference, texts=tuple(args.text or ("prose", "code")),
                         positions=args.positions, k=args.topk, api_key=args.api_key, model=args.model, mode=args.mode,
                         ladder_method=args.ladder_method)
    with progress_bar() as bar:
        tasks: dict[str, object] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, rate="")
            bar.update(tasks[name], completed=done, total=total)

        report = probe(config, progress if not args.json and console.is_terminal else None)
    data = report.as_json()
    if args.json:
        print(json.dumps(data))
    else:
        _print_report(data)
    return 0
