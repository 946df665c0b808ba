"""bitsmith tasks MODEL [--humaneval [--limit N]] [--reasoning [--n-per-family K]] [--lm-eval TASK[,TASK]] [--json OUT]"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="does the model still solve tasks: HumanEval pass@1 and a multi-step reasoning probe")
    p.add_argument("model", help="checkpoint, Hugging Face folder, .gguf file or alias")
    p.add_argument("--humaneval", action="store_true", help="run HumanEval (generated code runs in a guarded subprocess, not a sandbox)")
    p.add_argument("--limit", type=int, default=0, help="only the first N HumanEval problems (default: all 164)")
    p.add_argument("--reasoning", action="store_true", help="run the generated reasoning probe (5 families x 3 levels)")
    p.add_argument("--n-per-family", type=int, default=4, help="reasoning tasks per family and level (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="HumanEval generation budget per problem (default 512)")
    p.add_argument("--batch", type=int, default=8, help="HumanEval problems decoded together, greedy, with continuous "
                   "batching (default 8; 1: one at a time)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap prompts in the chat template (default: when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="send prompts as plain text")
    p.add_argument("--lm-eval", metavar="TASK[,TASK]", help="run lm-evaluation-harness tasks; offline: bitsmith's local "
                   "bitsmith_cloze_mc (multiple choice) and bitsmith_cloze_gen (generation); any harness task with hub access")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="only the first N documents of each harness task")
    p.add_argument("--report", metavar="DIR", help="add the harness table to DIR/report.md (beside bitsmith eval's metrics) and DIR/lm_eval.json")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    p.set_defaults(run=run)


def run_lm_eval(args: argparse.Namespace) -> dict:
    """The --lm-eval part: tasks checked before the model loads, the harness's table printed and
    (with --report) recorded; returns task -> metric -> value."""
    from bitsmith.cli.common import console, out
    from bitsmith.eval.harness import harness_table, parse_tasks, run_harness, summary
    from bitsmith.runtime.load import load_model

    if args.lm_eval_limit is not None and args.lm_eval_limit <= 0:
        raise ValueError(f"--lm-eval-limit must be a positive number, got {args.lm_eval_limit}")
    tasks, manager = parse_tasks(args.lm_eval)
    loaded = load_model(args.model)
    with console.status(f"lm-eval: {', '.join(tasks)}"):
        results = run_harness(loaded, tasks, manager, limit=args.lm_eval_limit)
    table = harness_table(results)
    out.print(f"{loaded.name}: lm-evaluation-harness")
    out.print(table, markup=False, highlight=False)
    if args.report:
        from bitsmith.eval.report import write_harness_results

        write_harness_results(args.report, loaded.name, table, summary(results))
    return summary(results)


def print_reasoning(probe) -> None:
    """Correct answers per family (rows) and level (columns)."""
    from rich.table import Table

    from bitsmith.cli.common import out

    table = Table(title=f"reasoning probe: {probe.accuracy:.1%} ({probe.correct}/{probe.n})")
    table.add_column("family")
    levels = sorted({rec.task.level for rec in probe.records})
    for level in levels:
        table.add_column(f"level {level}", justify="right")
    for family in probe.by_family:
        cells = []
        for level in levels:
            recs = [x for x in probe.records if x.task.family.value == family and x.task.level == level]
            cells.append(f"{sum(x.correct for x in recs)}/{len(recs)}")
        table.add_row(family, *cells)
    out.print(table)


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import out, progress_bar, write_json
    from bitsmith.eval.tasks import has_chat_template, make_complete, make_complete_many, run_tasks
    from bitsmith.runtime.load import load_model

    if args.lm_eval:
        data = {"lm_eval": run_lm_eval(args)}
        if not args.humaneval and not args.reasoning:
            if args.json:
                write_json(args.json, data)
            return 0
    if not args.humaneval and not args.reasoning:
        args.humaneval = args.reasoning = True
    for flag, value in (("--limit", args.limit), ("--n-per-family", args.n_per_family), ("--batch", args.batch)):
        if value < 0 or (flag in ("--n-per-family", "--batch") and value == 0):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    loaded = load_model(args.model)
    chat = has_chat_template(loaded.tokenizer) if args.chat is None else args.chat
    complete = make_complete(loaded.model, loaded.tokenizer, chat=chat)
    many = make_complete_many(loaded.model, loaded.tokenizer, chat=chat, max_batch=args.batch) if args.batch > 1 else None
    with progress_bar() as bar:
        tasks: dict[str, object] = {}

        def progress(suite: str, done: int, total: int) -> None:
            if suite not in tasks:
                tasks[suite] = bar.add_task(suite, total=total, rate="")
            bar.update(tasks[suite], completed=done, total=total)

        result = run_tasks(complete, loaded.name, chat, args.limit if args.humaneval else None,
                           args.n_per_family if args.reasoning else None, args.max_new_tokens, progress, many)
    data = {**result.as_dict(), **(data if args.lm_eval else {})}
    out.print(f"{loaded.name} ({'chat template' if chat else 'plain prompts'})")
    if "humaneval" in data:
        h = data["humaneval"]
        out.print(f"HumanEval pass@1: {h['pass_at_1']:.1%} ({h['passed']}/{h['n']}; " + ", ".join(f"{k} {v}" for k, v in h["status"].items()) + ")")
    if "reasoning" in data:
        print_reasoning(result.reasoning)
    if args.json:
        write_json(args.json, data)
    return 0
