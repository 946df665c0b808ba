"""Peers side by side with bitsmith on one model, one calibration text, one set of eval windows.

    python bench/peers/run.py --work WORK                  # everything, then the table
    python bench/peers/run.py --work WORK --only eval  # re-score what is there

Steps (each quantizer timed by /usr/bin/time -v for wall seconds and peak RSS):
prepare.py (reference HF folder + F32 GGUF + calibration text, bitsmith venv); the `hqq` package,
optimum-quanto and llm-compressor each in its own venv (`make bench-tools`, bench/tools.py); llama.cpp's
llama-quantize at Q4_0, Q4_K_M, IQ4_NL, Q3_K_M with and without an importance matrix; bitsmith's
own methods. Every output is then scored by bitsmith's evaluation (docs/PROTOCOL.md windows of the
prose slice) against the same fp32 reference, and one Markdown table is printed. A peer whose step
fails (or whose tool is not installed) is listed with the reason instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable

sys.path.insert(0, str(HERE.parent))  # bench/, for tools.py
import tools  # noqa: E402
from common import work_dir  # noqa: E402


def peer_py(name: str) -> str:
    """A peer venv's interpreter, unchecked: a missing one is reported per step (see missing_tool)."""
    return str(tools.peer_dir(name) / "bin" / "python")


def missing_tool(cmd: list[str]) -> str | None:
    """Why cmd cannot start (its peer interpreter or llama.cpp is not installed), or None."""
    try:
        if cmd[0].endswith("peer_llamacpp.sh"):
            tools.llama_bin("llama-quantize")
        elif not Path(cmd[0]).exists():
            raise tools.ToolMissing(f"{cmd[0]} does not exist; {tools.INSTALL_HINT.format(env='BITSMITH_PEER_<NAME>')}")
    except tools.ToolMissing as exc:
        return str(exc)
    return None


def steps(work: Path, model: str, calib_samples: int) -> list[tuple[str, list[str], Path, dict]]:
    """(name, command, output path, known facts) for every quantizer."""
    ref, ids = str(work / "reference"), str(work / "calib_ids.pt")
    out: list[tuple[str, list[str], Path, dict]] = []
    for bits, group in ((4, 64), (3, 64)):
        out.append((f"hqq w{bits} g{group}", [peer_py("hqq"), str(HERE / "peer_hqq.py"), ref,
                    str(work / f"hqq-w{bits}g{group}"), "--bits", str(bits), "--group", str(group)],
                    work / f"hqq-w{bits}g{group}", {}))
    out.append(("optimum-quanto qint4", [peer_py("quanto"), str(HERE / "peer_quanto.py"), ref,
                str(work / "quanto-qint4")], work / "quanto-qint4", {}))
    out.append(("llm-compressor GPTQ W4A16 g64", [peer_py("llmc"), str(HERE / "peer_llmc.py"), ref, ids,
                str(work / "llmc-w4g64"), "--group", "64", "--samples", str(calib_samples)], work / "llmc-w4g64", {}))
    for typ in ("Q4_0", "Q4_K_M", "IQ4_NL", "Q3_K_M"):
        for mode in ("plain", "imatrix"):
            suffix = "-imatrix" if mode == "imatrix" else ""
            out.append((f"llama.cpp {typ}{' + imatrix' if suffix else ''}",
                        [str(HERE / "peer_llamacpp.sh"), str(work), typ, mode], work / f"llamacpp-{typ}{suffix}.gguf", {}))
    bitsmith = [("gptq", "w4g128"), ("gptq", "w4g64"), ("gptq", "w4g32nf"), ("gptq", "w4g32fit"), ("gptq", "w3g64"),
                ("gptq", "w5g64"), ("gptq", "w5g32"), ("hqq", "w4g64"), ("hqq", "w4g32"), ("rtn", "w4g64")]
    # w5g64: 5.5 bits/weight (5 + 32 bits of scale and zero per 64), Q4_K_M's 5.53 here; w5g32 is 6.0;
    # hqq w4g32 (5.0): this package's SmolLM2 is 4-bit codes in groups of 32 with a float minimum, a
    # grid HQQ's float zeros can find again (a trivially exact case)
    for method, spec in bitsmith:
        dest = work / f"bitsmith-{method}-{spec}"
        cmd = [PY, "-m", "bitsmith", "quantize", model, "--method", method, "--spec", spec, "--out", str(dest),
               "--overwrite"]
        if method in ("gptq", "awq"):
            cmd += ["--calib-samples", str(calib_samples)]
        out.append((f"bitsmith {method} {spec}", cmd, dest, {}))
    return out


def timed(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MB) of cmd under /usr/bin/time -v."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return rc, time.perf_counter() - t0, int(rss.group(1)) / 1024 if rss else float("nan")


def gguf_bpw(path: Path) -> float:
    """Stored bits per weight of the block linears in a GGUF file."""
    from gguf import GGUFReader

    bits = n = 0
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
    return bits / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=None, help="work folder (default: ~/.cache/bitsmith/bench/peers)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=12)
    ap.add_argument("--only", choices=["quantize", "eval"], default=None)
    ap.add_argument("--match", default="", help="run only the quantizers whose name contains this")
    args = ap.parse_args()
    work = Path(args.work) if args.work else work_dir("peers")
    work.mkdir(parents=True, exist_ok=True)
    facts_path = work / "facts.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    todo = [s for s in steps(work, args.model, args.calib_samples) if args.match in s[0]]
    if args.only != "eval":
        if not (work / "reference-f32.gguf").exists():
            subprocess.run([PY, str(HERE / "prepare.py"), "--model", args.model, "--work", str(work),
                            "--calib-samples", str(args.calib_samples)], check=True, cwd=ROOT)
        for name, cmd, dest, _ in todo:
            log = work / (re.sub(r"\W+", "_", name) + ".log")
            missing = missing_tool(cmd)
            if missing:  # as a failed step: the table lists the reason, the other steps still run
                print(f"skipping {name}: {missing}", flush=True)
                facts[name] = {"rc": 127, "wall_s": 0.0, "rss_mb": float("nan"), "path": str(dest), "log": str(log),
                               "error": [missing]}
                facts_path.write_text(json.dumps(facts, indent=1))
                continue
            print(f"running {name} ...", flush=True)
            rc, secs, rss = timed(cmd, log)
            facts[name] = {"rc": rc, "wall_s": secs, "rss_mb": rss, "path": str(dest), "log": str(log)}
            if rc != 0:
                facts[name]["error"] = log.read_text(errors="replace").strip().splitlines()[-25:]
            facts_path.write_text(json.dumps(facts, indent=1))
    if args.only == "quantize":
        return
    score(work, args.model, facts, [s[0] for s in todo], args.max_windows)


def score(work: Path, model: str, facts: dict, names: list[str], max_windows: int) -> None:
    import bitsmith
    from bitsmith.eval.suite import evaluate_variants, shipped_text, text_windows

    reference = bitsmith.load(work / "reference")
    text = shipped_text()[:60_000]
    wins = text_windows(reference.tokenizer, text, 512, max_windows)
    rows, ref_ppl = [], float("nan")  # nan until a row scores (every step may have failed)
    for name in names:
        fact = facts.get(name)
        if fact is None:
            continue
        if fact["rc"] != 0:
            rows.append(f"| {name} | — | — | — | — | {fact['wall_s']:.0f} | {fact['rss_mb']:.0f} | failed: see {fact['log']} |")
            continue
        path = Path(fact["path"])
        if path.is_dir() and not (path / "tokenizer.json").exists():  # peers save weights only: same tokenizer
            import shutil

            for f in (work / "reference").glob("tokenizer*"):
                shutil.copy(f, path / f.name)
        try:
            loaded = bitsmith.load(path)
        except Exception as err:  # noqa: BLE001 - one unreadable output must not lose the table
            rows.append(f"| {name} | — | — | — | — | {fact['wall_s']:.0f} | {fact['rss_mb']:.0f} | not loadable: {err} |")
            continue
        if path.suffix == ".gguf":
            bpw = gguf_bpw(path)
        elif (path / "peer.json").exists():
            bpw = json.loads((path / "peer.json").read_text())["bits_per_weight"]
        else:
            bpw = loaded.info.report["bits_per_weight"]
        r = evaluate_variants(reference.model, {name: loaded.model}, wins)
        q, ref_ppl = r[name], r["reference"].ppl
        rows.append(f"| {name} | {bpw:.3f} | {q.kld_mean:.4f} | {q.top1:.3f} | {q.ppl:.3f} | {fact['wall_s']:.0f} | "
                    f"{fact['rss_mb']:.0f} | |")
        del loaded
    print(f"\n{model}: reference = its fp32 weights ({work / 'reference'}), ppl {ref_ppl:.3f}; "
          f"{wins.shape[0]} x 512 tokens of the prose slice; calibration = {work / 'calib.txt'}\n")
    print("| method | bits/weight | KLD | top-1 | ppl | quantize s | peak RSS MB | note |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
