"""bitsmith quantize MODEL --spec w4g128 | --budget 3.5bpw --method rtn|gptq|awq|hqq --out DIR [--calib FILE ...] [--resume]"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model into a packed bitsmith checkpoint")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or alias (smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b)")
    p.add_argument("--spec", default=None, help="quantization spec: w8, w4g128, w3g64s, ... (default w4g128)")
    p.add_argument("--method", default=None,
                   help="quantization method: rtn, hqq (no calibration), gptq, awq (calibrated) "
                        "(default: gptq with --calib, else hqq); vq (calibrated) for vector-codebook specs "
                        "such as w2g64vq / w3g128vq")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new checkpoint is complete")
    p.add_argument("--no-clip-search", action="store_true", help="RTN: plain min/max ranges, no clipping search")
    p.add_argument("--output-spec", default=None,
                   help="spec of the output head and the embedding table: auto (default: head w6g128 under a --spec "
                        "of at most 4 bits, an untied table w4g128 there, both w8 above; decode reads 6-8-bit instead of fp16 head bytes, as llama.cpp keeps its "
                        "output at Q6_K/Q8_0), any spec, or keep (unquantized); "
                        "with --budget auto follows the budget's bits/weight (a size budget: --spec), and the spec stays "
                        "fixed for those two tensors, outside a bits/weight budget (a size budget counts their bytes)")
    p.add_argument("--embedding-spec", default=None,
                   help="spec of an untied input embedding table apart from the head: auto (default: w4g128 under "
                        "--output-spec auto and bodies of at most 4 bits, where a lookup reads one row per token, "
                        "else the head's), any spec (w3g128, w2g64: smaller files, measured KLD cost in the README), "
                        "or keep; a tied table is the head and takes --output-spec only")
    p.add_argument("--quantize-head", action="store_true", help="quantize lm_head at --spec (overrides --output-spec)")
    p.add_argument("--quantize-embeddings", action="store_true", help="quantize the input embedding table at --spec (overrides --output-spec)")
    p.add_argument("--unquantized-dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="storage for tensors left unquantized")
    b = p.add_argument_group("mixed precision (one spec per layer, chosen to minimise the predicted KL under a budget)")
    b.add_argument("--budget", default=None, help="size budget: bits per quantized weight (3.5bpw) or checkpoint tensor bytes (900MB); replaces --spec")
    b.add_argument("--candidates", default="w2g64,w3g64,w4g64,w4g128,w8", help="specs each layer may get (default w2g64,w3g64,w4g64,w4g128,w8)")
    b.add_argument("--sensitivity", choices=["fisher", "measured"], default="fisher", help="cost estimator: fisher (one backward per window) or measured (a forward per layer x spec; tiny models)")
    b.add_argument("--allocation-from", default=None, metavar="CKPT",
                   help="take every layer's spec from the allocation recorded in CKPT (a checkpoint made with --budget) "
                        "instead of running the sensitivity pass again: the same allocation with another method, "
                        "output spec or calibration")
    b.add_argument("--sensitivity-windows", type=int, default=16, help="calibration sequences for the sensitivity pass (default 16, at most --calib-samples)")
    c = p.add_argument_group("calibration (gptq, awq; rtn/hqq use it only when --calib is given)")
    c.add_argument("--calib", type=Path, default=None, help="calibration text file, or a built-in text: prose (the shipped State of the Union text) or "
                   "prose+code (it and Python standard library sources in turns) (default: prose+code for awq and vq, else prose)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    c.add_argument("--calib-random", action="store_true", help="draw sequences at random offsets (default: consecutive from the start)")
    c.add_argument("--seed", type=int, default=0, help="seed for --calib-random (default 0)")
    c.add_argument("--awq", action="store_true", help="apply the AWQ transform to each block before quantizing (e.g. with --method gptq)")
    p.add_argument("--rotate", action="store_true",
                   help="quantize every linear in a randomized Hadamard basis (incoherence processing, any method "
                        "but awq; the runtime rotates the inputs online); helps most at 2-3 bits")
    p.add_argument("--rotate-seed", type=int, default=None, metavar="N", help="seed of --rotate's random signs (default 0)")
    c.add_argument("--compute-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="dtype of the block forwards; auto (default): bf16 where the CPU multiplies bf16 natively "
                        "(AVX-512 BF16 or AMX: ~1.8x faster, KLD no worse measured), else fp32. Hessians stay fp32")
    c.add_argument("--hessian-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="GEMM dtype of the Hessian products, summed in fp32 (bf16: ~20%% faster GPTQ, ~2%% higher KLD measured)")
    c.add_argument("--report-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="products of the per-layer reports' output errors: bf16 (default: bf16 operands, fp32 sums, "
                        "~2x faster; figures within ~1e-3 relative of fp32's) or fp32 (exact float32 products)")
    c.add_argument("--device", default="cpu",
                   help="where calibrated runs (gptq, rtn with --calib) compute: cpu (default), cuda or cuda:N; each block "
                        "goes to the GPU for its forwards, Hessians and solve, the model as a whole never does")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run: a calibrated one from its last finished block, "
                   "a calibration-free one (rtn, hqq) from its last finished output shard")
    p.set_defaults(run=run)


def default_method(args: argparse.Namespace) -> str:
    """--method, else the library's default (:func:`bitsmith.pipeline.plan.default_method`)."""
    from bitsmith.pipeline.plan import default_method as library_default

    return args.method or library_default(args.calib is not None)


def main_spec(args: argparse.Namespace) -> str:
    """--spec, else w4g128; under --budget with --method vq, where --budget replaces --spec and the plan's
    main spec must be a vector one (methods.vq.check_method), the first vq candidate."""
    if args.spec is not None:
        return args.spec
    if (args.budget is not None or args.allocation_from is not None) and args.method == "vq":
        vq = [s for s in candidate_specs(args.candidates) if s.grid == "vq"]
        if not vq:
            raise ValueError(f"--method vq with --budget needs a vq spec among --candidates (such as w2g64vq or "
                             f"w3g128vq), got {args.candidates}")
        return str(vq[0])
    return "w4g128"


def candidate_specs(text: str):
    """--candidates as QuantSpecs, in the order given."""
    from bitsmith.spec import QuantSpec

    return [QuantSpec.parse(s.strip()) for s in text.split(",") if s.strip()]


def compute_dtype(choice: str, device: str = "cpu"):
    """The torch dtype of the calibrated block forwards for --compute-dtype (auto: bf16 where the CPU,
    or the CUDA ``device``, has native bf16 instructions; :func:`bitsmith.pipeline.plan.resolve_compute_dtype`)."""
    from bitsmith.pipeline.common import STORAGE_DTYPES
    from bitsmith.pipeline.plan import resolve_compute_dtype

    return STORAGE_DTYPES[resolve_compute_dtype(choice, device)]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bitsmith.calib import CalibrationConfig
    from bitsmith.cli.common import console, dir_size_mb, out, progress_bar
    from bitsmith.io.checkpoint import CheckpointError
    from bitsmith.io.destination import Destination
    from bitsmith.pipeline.common import KEPT, dtype_name
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    # clip_search is sent only when turned off: each method keeps its own default otherwise (rtn and
    # gptq search ranges; after AWQ, whose own clipping is output-aware, plain min/max ranges)
    # --out before any work (the --budget sensitivity pass alone takes minutes): an existing path without
    # --overwrite, or with it anything but an earlier checkpoint, is refused now
    Destination(Path(args.out), "checkpoint", args.overwrite, CheckpointError).check()
    from bitsmith.pipeline.device import check_device

    device = check_device(args.device)  # before anything reads the model (the plan checks the method for it)
    args.method = default_method(args)
    options = {**({"clip_search": False} if args.no_clip_search else {}), **({"awq": True} if args.awq else {}),
               **({"rotate": True} if args.rotate else {}),
               **({"rotate_seed": args.rotate_seed} if args.rotate_seed is not None else {})}
    if args.rotate_seed is not None and not args.rotate:
        raise ValueError("--rotate-seed needs --rotate")
    recorded = _recorded(args)
    args.spec = main_spec(args)
    plan = QuantizePlan(
        spec=QuantSpec.parse(args.spec), method=args.method, options=options,
        quantize_head=args.quantize_head, quantize_embeddings=args.quantize_embeddings, unquantized_dtype=args.unquantized_dtype,
        compute_dtype=dtype_name(compute_dtype(args.compute_dtype, device)), hessian_dtype=args.hessian_dtype,
        report_dtype=args.report_dtype, device=device, calib=_device_calib(args, device),
    )
    plan = _outputs(args, plan, recorded)
    calib = None
    if args.calib is not None or plan.needs_calibration:
        calib = CalibrationConfig(text=args.calib, samples=args.calib_samples, seq_len=args.calib_len,
                                  seed=args.seed, random_offsets=args.calib_random)
    plan, allocation, calib = _per_layer_specs(args, plan, calib, recorded)
    with progress_bar() as bar:
        task = bar.add_task(f"quantize {args.budget or args.spec}", total=None, rate="")
        done = lambda name, i, n: bar.update(task, completed=i, total=n, rate=name)  # noqa: E731
        path = quantize(args.model, Path(args.out), replace(plan, calib=calib), progress=done, resume=args.resume,
                        overwrite=args.overwrite)
    from bitsmith.io.checkpoint import read_info

    info = read_info(path)
    if allocation is not None:
        _record(path, info, allocation)
        info = read_info(path)
    report = info.report if info else {}
    console.print(f"quantized {report.get('quantized_weights', 0):,} weights at {report.get('bits_per_weight', 0):.3f} bits/weight in {report.get('seconds', 0)} s")
    for layer in report.get("unquantized_layers", []):  # the overflow rule: said here too, whatever the log level
        console.print(f"warning: {layer['name']} is not quantized: {layer[KEPT]}", markup=False)
    out.print(f"{path}  ({dir_size_mb(path):.1f} MB)")
    return 0


def _device_calib(args: argparse.Namespace, device: str):
    """The calibration the plan is first built with: none (the run decides below), except off the CPU,
    where the plan must know now that the run is calibrated (it refuses an uncalibrated --device run).
    Not the full --calib config on every device: on the CPU that would make rtn and hqq runs with --budget
    calibrated, where their --calib text feeds only the sensitivity pass (_allocate)."""
    if device == "cpu" or args.calib is None:
        return None
    from bitsmith.calib import CalibrationConfig

    return CalibrationConfig(text=args.calib)


def _per_layer_specs(args: argparse.Namespace, plan, calib, recorded):
    """(plan, allocation, calibration): --budget's new allocation, --allocation-from's recorded one,
    or the plan as it is (no allocation)."""
    if args.budget is not None:
        return _allocate(args, plan, calib)
    if recorded is None:
        return plan, None, calib
    from bitsmith.plan.reuse import replay_allocation

    plan = replay_allocation(args.model, plan, recorded)
    return plan, recorded, (calib if plan.needs_calibration else None)  # as under --budget: rtn/hqq take the specs alone


def _recorded(args: argparse.Namespace):
    """--allocation-from's recorded allocation (None without it); its candidates stand in for
    --candidates, so that a vq plan's main spec is found as under --budget."""
    if args.allocation_from is None:
        return None
    if args.budget is not None:
        raise ValueError("give either --budget (a new allocation) or --allocation-from (a recorded one), not both")
    from bitsmith.plan.reuse import recorded_allocation

    recorded = recorded_allocation(args.allocation_from)
    args.candidates = ",".join(recorded.extra.get("candidates") or sorted({str(s) for s in recorded.specs.values()}))
    return recorded


def _outputs(args: argparse.Namespace, plan, recorded=None):
    """The embedding/head policy: --output-spec and --embedding-spec (default auto: head w6g128 and an
    untied table w4g128 under bodies of at most 4 bits, w8 above; under --budget the body is the
    budget's bits/weight rounded down, or the main spec for a size budget, and under --allocation-from
    the recorded bits/weight; under either the specs are pinned, outside the allocation)."""
    from bitsmith.pipeline.outputs import AUTO, budget_body, with_output_spec
    from bitsmith.plan.allocate import Budget

    spec = _flag_spec("--output-spec", args.output_spec or AUTO)
    embedding = _flag_spec("--embedding-spec", args.embedding_spec or AUTO)
    # with --budget the spec pins the embedding and head: the allocator leaves them at it and a
    # bits/weight budget counts the other layers only (a size budget counts their bytes too)
    if recorded is not None:
        bpw = recorded.bits_per_weight
    else:  # no budget, or a size budget: the main spec is the body
        bpw = Budget.parse(args.budget).bits_per_weight if args.budget is not None else None
    return with_output_spec(plan, args.model, spec, body=budget_body(plan.spec, bpw), embedding=embedding)


def _flag_spec(flag: str, text: str):
    """:func:`~bitsmith.pipeline.outputs.parse_output_spec` of ``text``, its error naming the flag that gave it."""
    from bitsmith.pipeline.outputs import parse_output_spec

    try:
        return parse_output_spec(text)
    except ValueError as err:
        raise ValueError(f"{flag} {text}: {err}") from None


def _allocate(args: argparse.Namespace, plan, calib):
    """Sensitivity on the calibration text, then the allocation; returns the plan with per-layer
    specs, the allocation, and the calibration the quantize step itself needs (calibrated plans only)."""
    from bitsmith.calib import CalibrationConfig
    from bitsmith.cli.common import console, progress_bar
    from bitsmith.models import open_source
    from bitsmith.pipeline.quantize import calibration
    from bitsmith.plan.allocate import Budget
    from bitsmith.plan.sensitivity import check_plan_budget, plan_allocation

    budget = Budget.parse(args.budget)
    candidates = candidate_specs(args.candidates)
    check_plan_budget(args.model, plan, budget, candidates)  # an unreachable budget, before minutes of work
    # the sensitivity pass reads the text the quantize step will (vq and awq: prose + code by default)
    sens_text = args.calib if args.calib is not None else calibration(plan).text
    sens_calib = CalibrationConfig(text=sens_text, samples=min(args.calib_samples, args.sensitivity_windows),
                                   seq_len=args.calib_len, seed=args.seed, random_offsets=args.calib_random)
    tokens = sens_calib.batches(open_source(args.model).tokenizer())  # [samples, seq_len]
    with progress_bar() as bar:
        task = bar.add_task(f"sensitivity ({args.sensitivity}) on {tokens.shape[0]} x {tokens.shape[1]} tokens",
                            total=None, rate="")
        done = lambda name, i, n: bar.update(task, completed=i, total=n, rate=name)  # noqa: E731
        plan, allocation = plan_allocation(args.model, plan, budget, candidates, tokens, estimator=args.sensitivity,
                                           progress=done)
    console.print(f"allocation for {budget}: {allocation.bits_per_weight:.3f} bits/weight, predicted KL "
                  f"{allocation.predicted_cost:.4g}; " + ", ".join(f"{n} x {s}" for s, n in allocation.counts().items()))
    # rtn and hqq quantize in one pass with the allocated specs; the calibration text was for the costs
    return plan, allocation, (calib if plan.needs_calibration else None)


def _record(path, info, allocation) -> None:
    """Check the checkpoint holds the allocated specs, then add the allocation to its report."""
    from bitsmith.plan.sensitivity import record_allocation

    # a layer kept at fp32 because its scales overflow fp16 (warned about, listed in the report) is no mismatch
    kept = {l["name"] for l in (info.report.get("unquantized_layers", []) if info else [])}
    wrong = sorted(n for n, s in allocation.specs.items() if n not in kept and (info is None or info.specs.get(n) != s))
    if wrong:
        raise ValueError(f"the checkpoint at {path} does not carry the allocated spec of {wrong[0]} "
                         f"({allocation.specs[wrong[0]]}); this quantization path ignores per-layer specs, "
                         "use --method rtn or hqq with --budget")
    record_allocation(path, allocation)
