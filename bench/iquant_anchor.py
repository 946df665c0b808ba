"""llama.cpp's i-quants with an importance matrix, scored on bitsmith's own windows (issue 19's anchors):

    python bench/iquant_anchor.py --model qwen2.5-coder-1.5b --types IQ2_XS IQ3_XXS IQ4_NL \\
        [--check Q8_0] [--chunks 16] [--calib-text prose+code] [--max-windows 4] [--extra LABEL=PATH ...]
        [--threads 1] [--work DIR]

One reference for every row: bitsmith exports the model's unquantized weights as an F32 GGUF;
llama-imatrix computes an importance matrix on the first --chunks x 512 tokens of --calib-text (default
the shipped State of the Union text, PROTOCOL's calibration set; ``prose+code`` is the mix that vq and awq
calibrate on by default, so their rows are compared like for like); llama-quantize --imatrix makes each
--types file from the F32 GGUF (--check types are made without the imatrix: Q8_0 checks the whole read path, its KLD must be
near 0). Every file is then scored by bitsmith's evaluator against the float32 reference on the same
windows of each --texts domain (default prose and code, --max-windows each): KLD, top-1, ppl.

Reading i-quants: bitsmith's GGUF source dequantizes with ``gguf.quants.dequantize``; this script puts
the gguf-py package of the llama.cpp tree that bench/tools.py finds first on the import path, so the
decoder is the one shipped with the binaries that wrote the files (its tests/test_quants.py checks it
against libggml bit for bit). No llama.cpp code or table is copied into bitsmith. The files keep
llama.cpp's tensor layout, so any q/k permutation is undone by the same code as for every GGUF.

The KLD is exact (not the top-k cache of ``bitsmith eval --reference-cache``): the reference's float32
logits are computed once per window and kept on disk under the work folder, so only one model is in
memory at a time. bitsmith's own checkpoints (or any file load_model reads) are scored on the same
windows with --extra LABEL=PATH. bpw = stored bits / weights of the decoder blocks' matrices (a GGUF's
header, a bitsmith checkpoint's report); MB = the whole file or folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import tools
from common import block_bpw, report_block_bpw, work_dir

from bitsmith.calib.data import PROSE, read_calibration_text  # imports no gguf (use_tree_gguf must come first)


def use_tree_gguf() -> Path:
    """Put llama.cpp's own gguf-py first on the import path (before anything imports gguf)."""
    tree = tools.llama_cpp_dir() / "gguf-py"
    if not (tree / "gguf" / "quants.py").is_file():
        raise tools.ToolMissing(f"llama.cpp's gguf-py is not at {tree}; "
                                + tools.INSTALL_HINT.format(env="BITSMITH_LLAMA_CPP"))
    sys.path.insert(0, str(tree))
    import gguf

    if Path(gguf.__file__).resolve().parent != (tree / "gguf").resolve():
        raise SystemExit(f"gguf was imported from {gguf.__file__} before llama.cpp's copy at {tree} could be used")
    return tree


def run(cmd: list[str], log: Path) -> None:
    """Run one llama.cpp tool, its output to ``log``; a failure ends the run with the log's tail."""
    with log.open("w") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{log.read_text()[-3000:]}")


def text_tag(calib: str) -> str:
    """A file-name tag for the imatrix's calibration text: empty for the default prose (the names of
    earlier runs' files), else a short hash of the text itself."""
    if calib == PROSE:
        return ""
    return "-" + hashlib.sha1(read_calibration_text(calib).encode("utf-8")).hexdigest()[:8]


def make_imatrix(binary: Path, ref: Path, work: Path, chunks: int, threads: int, calib: str = PROSE) -> Path:
    """llama-imatrix on the first ``chunks`` x 512 tokens of ``calib`` (a --calib value of bitsmith's:
    ``prose``, the shipped State of the Union text; ``prose+code``, the mix vq and awq calibrate on by
    default; or a file), cached by chunks and text."""
    out = work / f"imatrix-{chunks}{text_tag(calib)}.gguf"
    if not out.exists():
        text = work / f"calib{text_tag(calib)}.txt"
        text.write_text(read_calibration_text(calib), encoding="utf-8")
        partial = out.with_name(out.stem + ".partial.gguf")  # llama-imatrix picks its format by the extension
        run([str(binary), "-m", str(ref), "-f", str(text), "-c", "512", "--chunks", str(chunks),
             "-t", str(threads), "-o", str(partial)], work / f"{out.stem}.log")
        partial.rename(out)
    return out


def make_quant(binary: Path, ref: Path, qtype: str, imatrix: Path | None, work: Path, threads: int) -> Path:
    """llama-quantize ``ref`` to ``qtype`` (with the importance matrix when given); cached by name
    (the imatrix's text tag is part of it)."""
    tag = imatrix.stem.partition("-")[2].partition("-")[2] if imatrix else ""
    out = work / (f"{qtype}-imatrix{'-' + tag if tag else ''}.gguf" if imatrix else f"{qtype}.gguf")
    if not out.exists():
        partial = out.with_suffix(".partial")
        cmd = [str(binary)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(ref), str(partial), qtype, str(threads)]
        run(cmd, work / f"{out.stem}.log")
        partial.rename(out)  # a file under the final name is always complete
    return out


def windows_by_domain(tokenizer, names: list[str], max_windows: int | None) -> dict:
    """{domain: windows [n, 512]} of bitsmith's evaluation texts (PROTOCOL), the same for every row."""
    from bitsmith.eval.domains import resolve_domains
    from bitsmith.eval.suite import text_windows

    return {d.name: text_windows(tokenizer, d.text, 512, max_windows) for d in resolve_domains(names)}


def logits_file(folder: Path, domain: str, window) -> Path:
    """Where one window's reference logits live: named by the window's tokens, so a reused file always fits."""
    digest = hashlib.sha256(window.numpy().tobytes()).hexdigest()[:16]
    return folder / f"{domain}-{digest}.safetensors"


def save_reference_logits(load_reference, wins: dict, folder: Path) -> None:
    """The reference's float32 logits [ctx - 1, V] of every window, one file each (skipped when present)."""
    import torch
    from safetensors.torch import save_file

    missing = [(d, w) for d, ws in wins.items() for w in ws if not logits_file(folder, d, w).exists()]
    if not missing:
        return
    model = load_reference()
    with torch.inference_mode():
        for domain, window in missing:
            logits = model(input_ids=window.long().unsqueeze(0), use_cache=False).logits[0, :-1].float()
            path = logits_file(folder, domain, window)
            save_file({"logits": logits.contiguous()}, str(path.with_suffix(".partial")))
            path.with_suffix(".partial").rename(path)
    del model


def score(model, wins: dict, folder: Path) -> dict:
    """{domain: EvalResult} of ``model`` against the stored reference logits (exact KL, top-1, ppl)."""
    import torch
    from safetensors.torch import load_file

    from bitsmith.eval.metrics import summarize, token_stats
    from bitsmith.eval.perplexity import eval_mode

    results = {}
    with torch.inference_mode(), eval_mode(model):
        for domain, ws in wins.items():
            stats = []
            for window in ws:
                ref = load_file(str(logits_file(folder, domain, window)))["logits"]
                logits = model(input_ids=window.long().unsqueeze(0), use_cache=False).logits[0, :-1]
                stats.append(token_stats(ref, logits, window[1:].long()))
                del ref, logits
            results[domain] = summarize(stats)
    return results


def layout_error(ref: Path, path: Path, names=("blk.0.attn_q.weight", "blk.0.attn_k.weight")) -> float:
    """The largest relative error ||w - w_ref|| / ||w_ref|| of a few tensors of a GGUF ``path``
    against the F32 reference, both read by bitsmith's GGUF source (fix-ups included): a quantizer's
    error is well below 1, a permutation or layout mix-up is ~1.4."""
    from bitsmith.models.gguf_source import GGUFStore, read_gguf_header

    a, b = (GGUFStore(p, read_gguf_header(p)) for p in (ref, path))
    worst = 0.0
    for gname in names:
        name = next(n for n in a.names() if a.gguf_name(n) == gname)
        w_ref, w = a.load(name), b.load(name)
        worst = max(worst, float((w - w_ref).norm() / w_ref.norm()))
    return worst


def load_row(path: Path):
    """A GGUF file as its exact float decoding; anything else (a bitsmith checkpoint) as load_model loads it."""
    from bitsmith.runtime.load import load_model

    return load_model(path, dequantize=path.suffix == ".gguf").model


def checkpoint_block_bpw(path: Path, model: str) -> float | None:
    """Block bits/weight of a bitsmith checkpoint folder from its report (None for anything else)."""
    import json

    from bitsmith.models import open_source
    from bitsmith.pipeline.common import quantizable_layers

    meta = path / "bitsmith.json"
    if not meta.is_file():
        return None
    return report_block_bpw(json.loads(meta.read_text())["report"], quantizable_layers(open_source(model).config))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--types", nargs="*", default=["IQ2_XS", "IQ3_XXS", "IQ4_NL"], help="llama.cpp types made with the imatrix")
    ap.add_argument("--check", nargs="*", default=[], help="types made without the imatrix (e.g. Q8_0: KLD ~0 checks the read path)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="LABEL=PATH", help="other files to score on the same windows")
    ap.add_argument("--chunks", type=int, default=16, help="calibration chunks of 512 tokens (default 16)")
    ap.add_argument("--calib-text", default=PROSE, help="the imatrix's text, as bitsmith's --calib: prose (default), "
                    "prose+code (what vq and awq calibrate on by default: the like-for-like anchor for them), or a file")
    ap.add_argument("--texts", nargs="+", default=["prose", "code"], help="evaluation domains (default prose code)")
    ap.add_argument("--max-windows", type=int, default=4, help="windows per domain (default 4)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BITSMITH_THREADS") or 1))
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: bench/common.work_dir's iquant-anchor)")
    args = ap.parse_args()
    extras = []
    for spec in args.extra:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).exists():
            ap.error(f"--extra {spec!r}: give LABEL=PATH of an existing file or folder")
        extras.append((label, Path(path)))
    if not (args.types or args.check or extras):
        ap.error("nothing to score: give --types, --check or --extra")
    needs_bins = bool(args.types or args.check)  # llama.cpp's rows; bitsmith checkpoints alone need just the tree
    try:
        use_tree_gguf()
        quantize = tools.llama_bin("llama-quantize") if needs_bins else None
        imatrix_bin = tools.llama_bin("llama-imatrix") if args.types else None
    except tools.ToolMissing as exc:
        raise SystemExit(f"error: {exc}") from None

    import torch

    import bitsmith
    import bitsmith.models  # noqa: F401  before io.gguf.export, which otherwise meets a circular import
    from bitsmith.io.gguf.export import export_gguf
    from bitsmith.models import open_source

    torch.set_num_threads(args.threads)
    work = (args.work or work_dir("iquant-anchor")) / args.model
    work.mkdir(parents=True, exist_ok=True)
    ref_gguf = work / "ref-F32.gguf"
    if not ref_gguf.exists() and (needs_bins or any(p.suffix == ".gguf" for _, p in extras)):
        export_gguf(args.model, ref_gguf, "F32")
    # each llama.cpp file is made just before it is scored, so a long run prints its rows as it goes
    imatrix = make_imatrix(imatrix_bin, ref_gguf, work, args.chunks, args.threads, args.calib_text) if args.types else None
    rows = ([(t, lambda t=t: make_quant(quantize, ref_gguf, t, None, work, args.threads)) for t in args.check]
            + [(f"{t} +imatrix", lambda t=t: make_quant(quantize, ref_gguf, t, imatrix, work, args.threads)) for t in args.types]
            + [(label, lambda path=path: path) for label, path in extras])

    wins = windows_by_domain(open_source(args.model).tokenizer(), args.texts, args.max_windows)
    logits_dir = work / "ref-logits"
    logits_dir.mkdir(exist_ok=True)
    t0 = time.time()
    save_reference_logits(lambda: bitsmith.load(args.model).model, wins, logits_dir)  # loaded only if a window lacks them
    print(f"reference logits: {time.time() - t0:.0f} s", flush=True)

    table = []
    for label, make in rows:
        t0 = time.time()
        path = make()
        print(f"{label}: {path.name} ready in {time.time() - t0:.0f} s", flush=True)
        t0 = time.time()
        model = load_row(path)
        res = score(model, wins, logits_dir)
        del model
        bpw = block_bpw(path) if path.suffix == ".gguf" else checkpoint_block_bpw(path, args.model)
        table.append((label, path, bpw, res))
        check = f"blk.0 q/k relative error {layout_error(ref_gguf, path):.3f}; " if path.suffix == ".gguf" else ""
        print(f"{label}: {time.time() - t0:.0f} s; {check}" + "; ".join(f"{d} {r.as_dict()}" for d, r in res.items()), flush=True)
    print_table(args, wins, table)
    return 0


def print_table(args, wins: dict, table: list) -> None:
    """The markdown table of every row, after the reference's own ppl per domain."""
    from bitsmith.cli.common import dir_size_mb

    domains = list(wins)
    print()
    print(f"{args.model}; reference float32, ppl " + ", ".join(f"{d} {table[0][3][d].ref_ppl:.3f}" for d in domains)
          + "; windows " + ", ".join(f"{d} {w.shape[0]} x {w.shape[1]}" for d, w in wins.items())
          + f"; imatrix {args.chunks} x 512 tokens of State of the Union")
    head = " | ".join(f"{d} KLD | {d} top-1 | {d} ppl" for d in domains)
    print(f"| type | bpw (blocks) | MB | {head} |")
    print("|---" * (3 + 3 * len(domains)) + "|")
    for label, path, bpw, res in table:
        cells = " | ".join(f"{res[d].kld_mean:.4f} | {res[d].top1:.3f} | {res[d].ppl:.3f}" for d in domains)
        size = dir_size_mb(path)  # a file, or a checkpoint folder's files
        print(f"| {label} | {'-' if bpw is None else f'{bpw:.3f}'} | {size:.0f} | {cells} |")


if __name__ == "__main__":
    sys.exit(main())
