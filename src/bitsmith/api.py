"""The front door: the few calls a script or a benchmark needs, in the user's terms.

    import bitsmith
    path = bitsmith.quantize("smollm2-135m", "smol-w4", spec="w4g128")          # hqq, no calibration
    path = bitsmith.quantize("smollm2-135m", "smol-w4g", spec="w4g128", method="gptq")
    model = bitsmith.load(path)                                                   # LoadedModel
    scores = bitsmith.evaluate(path, reference="smollm2-135m", max_windows=4)     # name -> EvalResult

Each call builds the typed objects the layers below take (:class:`~bitsmith.pipeline.plan.QuantizePlan`,
:class:`~bitsmith.runtime.options.RuntimeOptions`, evaluation windows) and calls one library
function; nothing here holds logic of its own. The CLI commands are the same calls with argument
parsing and printing around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bitsmith.spec import QuantSpec

if TYPE_CHECKING:
    from bitsmith.calib.data import CalibrationConfig
    from bitsmith.eval.metrics import EvalResult
    from bitsmith.runtime.load import LoadedModel
    from bitsmith.runtime.options import RuntimeOptions

__all__ = ["QuantSpec", "evaluate", "load", "quantize"]


def quantize(
    model: str | Path,
    out: str | Path,
    spec: str | QuantSpec = "w4g128",
    method: str | None = None,
    *,
    calibration: str | Path | CalibrationConfig | None = None,
    options: dict[str, Any] | None = None,
    compute_dtype: str = "auto",
    device: str = "cpu",
    output_spec: str | QuantSpec | None = "auto",
    embedding_spec: str | QuantSpec | None = "auto",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Quantize ``model`` (a Hugging Face folder, a GGUF file or an installed alias such as
    ``smollm2-135m``) into a bitsmith checkpoint folder ``out``; returns its path.

    ``method`` defaults to hqq, or gptq when ``calibration`` (a text file, or a
    :class:`~bitsmith.calib.data.CalibrationConfig` for samples and lengths) is given, as on the
    command line; calibrated methods without ``calibration`` use the shipped State of the Union
    text (``"prose"``), AWQ and vq the built-in prose + code text (``"prose+code"``). ``options`` are the
    method's own (e.g. ``{"clip_search": False}``); ``compute_dtype`` (auto, bf16, fp32) is that of
    calibrated block forwards, ``device`` (cpu, cuda, cuda:N) where they and the methods compute. ``output_spec`` quantizes the embedding
    table and the head (default ``"auto"``, as on the command line: ``w6g128`` under a body of at most 4
    bits, ``w8`` above; ``None`` or ``"keep"`` leaves them unquantized). ``embedding_spec`` sets an untied
    embedding table apart (default ``"auto"``: ``w4g128`` beside an auto head under such bodies, else the
    head's spec; a tied table is the head, so only ``output_spec`` sets it)."""
    from bitsmith.calib.data import CalibrationConfig
    from bitsmith.pipeline.outputs import parse_output_spec, with_output_spec
    from bitsmith.pipeline.device import check_device
    from bitsmith.pipeline.plan import QuantizePlan, default_method, resolve_compute_dtype
    from bitsmith.pipeline.quantize import quantize as run

    parsed = spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)
    calib = calibration if isinstance(calibration, CalibrationConfig) or calibration is None else (
        CalibrationConfig(text=Path(calibration)))
    device = check_device(device)  # before compute_dtype's auto asks the device
    plan = QuantizePlan(parsed, method or default_method(calibration is not None), dict(options or {}),
                        compute_dtype=resolve_compute_dtype(compute_dtype, device), calib=calib, device=device)
    outputs, table = (parse_output_spec(s) if isinstance(s, str) else s for s in (output_spec, embedding_spec))
    plan = with_output_spec(plan, model, outputs, embedding=table)
    return run(model, Path(out), plan, progress=progress, overwrite=overwrite)


def load(model: str | Path, *, options: RuntimeOptions | None = None) -> LoadedModel:
    """Load a bitsmith checkpoint, a GPTQ folder, a GGUF file, a Hugging Face folder or an alias as a
    transformers model with bitsmith's packed layers (``.model``, ``.tokenizer``, ``.info``).
    ``options`` chooses kernels and caches (default: :meth:`RuntimeOptions.from_env`)."""
    from bitsmith.runtime.load import load_model

    return load_model(model, options=options)


def evaluate(
    model: str | Path,
    *,
    reference: str | Path | None = None,
    text: str | Path | None = None,
    ctx: int = 512,
    max_windows: int | None = None,
) -> dict[str, EvalResult]:
    """Perplexity of ``model`` on ``text`` (default: the shipped Pride and Prejudice slice) in
    ``ctx``-token windows; with a ``reference``, also KL divergence and top-1 agreement against it
    (docs/PROTOCOL.md). Returns ``{"model": ..., "reference": ...}`` results."""
    from bitsmith.eval.suite import evaluate_variants, read_text, text_windows

    from bitsmith.runtime.options import RuntimeOptions

    exact = RuntimeOptions.for_measurement()  # quality numbers of the checkpoint's own arithmetic
    variant = load(model, options=exact)
    ref = load(reference, options=exact).model if reference is not None else None
    windows = text_windows(variant.tokenizer, read_text(text), ctx, max_windows)  # [n, ctx]
    return evaluate_variants(ref, {"model": variant.model}, windows)
