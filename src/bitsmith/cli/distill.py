"""bitsmith distill CKPT --reference MODEL --out DIR [--steps N --lr X --samples N --seq-len N --block-steps N --resume]"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="recover a quantized checkpoint's quality: tune its scales, zeros and norms "
                                       "towards the unquantized model's logits (codes frozen)")
    p.add_argument("checkpoint", help="a bitsmith checkpoint (from `bitsmith quantize`)")
    p.add_argument("--reference", required=True, help="the unquantized model it was quantized from (folder, .gguf or alias)")
    p.add_argument("--out", required=True, help="output folder for the distilled checkpoint (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new checkpoint is complete")
    p.add_argument("--steps", type=int, default=40,
                   help="end-to-end optimizer steps (default 40; 0 with --block-steps: the block stage alone)")
    p.add_argument("--lr", type=float, default=1e-3, help="relative learning rate (default 1e-3: each tensor moves by "
                                                          "about lr x its mean magnitude per step)")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--check-every", type=int, default=None,
                   help="steps between checks of the whole calibration loss (default: one pass over the samples)")
    p.add_argument("--block-steps", type=int, default=0,
                   help="first tune each decoder block towards the reference block's output for this many steps "
                        "(block-wise stage; default 0: end-to-end only)")
    p.add_argument("--block-lr", type=float, default=None, help="relative learning rate of the block stage (default: --lr)")
    p.add_argument("--ref-topk", type=int, default=256,
                   help="over a vocabulary wider than --ref-topk-above, keep only the reference's K most likely tokens "
                        "per position and their rest mass (a lower bound of the KL; default 256)")
    p.add_argument("--ref-topk-above", type=int, default=65_536,
                   help="vocabulary size above which --ref-topk applies (default 65536: SmolLM2's 49k in full, "
                        "Gemma-3's 262k as top-k; 0: always top-k)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text file (default: the shipped State of the Union "
                   "text), prose+code (the built-in mix), or generated: sequences the reference model samples itself "
                   "(temperature 1, seeded by --seed), so the tuning follows the model's distribution, not one text's")
    p.add_argument("--calib-random", action="store_true",
                   help="draw the calibration sequences at random offsets across the whole text (default: consecutive "
                        "from its start)")
    p.add_argument("--seed", type=int, default=0, help="seed for --calib-random (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last check")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bitsmith.cli.common import console, dir_size_mb, out, progress_bar
    from bitsmith.recover import DistillConfig, distill

    config = DistillConfig(steps=args.steps, lr=args.lr, samples=args.samples, seq_len=args.seq_len, batch=args.batch,
                           check_every=args.check_every, calib_text=None if args.calib is None else str(args.calib),
                           random_offsets=args.calib_random, seed=args.seed, block_steps=args.block_steps,
                           block_lr=args.block_lr,
                           ref_topk=args.ref_topk, ref_topk_above=args.ref_topk_above)
    config.validate()  # before loading anything
    printed: list[tuple] = []  # the checks (and tuned blocks) already printed

    def ident(point: dict) -> tuple:
        return point.get("stage", "e2e"), point.get("step"), point.get("block")

    def line(point: dict) -> str:
        if point.get("stage") == "block":
            kept = "kept" if point["accepted"] else "not better: block restored"
            return (f"  block {point['block']:>4}  relative output error {point['error_before']:.5f} -> "
                    f"{point['error_after']:.5f}  {kept}")
        if point.get("stage") == "blocks":
            mark = "accepted" if point["accepted"] else "rejected: the state before the block stage restored"
            return f"  after the block stage  KLD {point['kld']:.5f}  {mark}"
        mark = "accepted" if point["accepted"] else "rejected: best restored, lr halved"
        return f"  step {point['step']:>5}  KLD {point['kld']:.5f}  lr {point['lr']:.2e}  {mark}"

    console.print("calibration KLD per check (KL(reference || quantized), mean over positions):")
    with progress_bar(transient=True) as bar:
        task = bar.add_task("distill", total=config.steps, rate="")

        def done(step: int, total: int, last: dict) -> None:
            if last and ident(last) not in printed:
                printed.append(ident(last))
                bar.console.print(line(last), markup=False)
            bar.update(task, completed=step, rate=f"KLD {last.get('kld', float('nan')):.4f}")

        result = distill(args.checkpoint, args.reference, Path(args.out), config, resume=args.resume,
                         overwrite=args.overwrite, progress=done)
    for point in result.curve:  # checks no progress call showed (the initial one, a resumed run's earlier ones)
        if ident(point) not in printed:
            console.print(line(point), markup=False)
    console.print(f"calibration KLD {result.initial_loss:.5f} -> {result.best_loss:.5f} "
                  f"({100 * (1 - result.best_loss / max(result.initial_loss, 1e-12)):.1f}% less) in {result.seconds:.0f} s")
    out.print(f"{result.path}  ({dir_size_mb(result.path):.1f} MB)")
    return 0
