"""The quantize plan: everything one run does, decided before it starts, in one frozen object.

A plan names the spec (and per-layer overrides), the method as the user spelled it, its options,
the head/embedding policy, the dtypes, the calibration source and the streaming budgets. The user's
spelling is parsed here and only here (:func:`parse_method`): ``--method awq`` is the AWQ transform
followed by a quantizer (``quantizer=`` option, default rtn), ``awq=true`` adds the AWQ transform to
any method. The pipeline then reads ``plan.quantizer`` and ``plan.transforms`` and never looks at a
method's name again. Importing this module is torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitsmith.models.family import HEAD_WEIGHT
from bitsmith.spec import QuantSpec

if TYPE_CHECKING:
    from bitsmith.calib.data import CalibrationConfig
    from bitsmith.methods.base import Method

QUANTIZER_OPTION = "quantizer"  # the plan's own option: the method behind a transform-only spelling
DEFAULT_BATCH_SIZE = 8  # sequences per block forward
DEFAULT_SPILL_BYTES = 2 * 1024**3  # calibration activations above this go to a memory-mapped file
DEFAULT_REPLAY_BYTES = 1024**3  # finished sub-modules' outputs kept per block (OutputReplay)


def default_method(calibration_given: bool) -> str:
    """gptq when calibration text is given, else hqq: the best measured method of each kind
    (bench/results/calibrated-methods); rtn stays one option away."""
    return "gptq" if calibration_given else "hqq"


def resolve_compute_dtype(choice: str, device: str = "cpu") -> str:
    """The dtype name ("bf16" or "fp32") of calibrated block forwards for a choice of auto, bf16 or
    fp32. ``auto`` picks bf16 where bf16 matmuls pay on this CPU (``kernels.cpu.fast_bf16_matmul``: AMX,
    or AVX512-BF16 measured at least twice float32's speed, as on a Zen 5; a Xeon with AVX512-BF16 and
    no AMX measured it slower than fp32, session 21). Measured on SmolLM2 (AMX): one bf16 forward over
    128 x 512 tokens 71 s vs 128 s in fp32, and GPTQ's KLD 0.1413 (bf16 forwards) vs 0.1445 (fp32). On a
    CUDA ``device`` (checked: :func:`bitsmith.pipeline.device.check_device`) ``auto`` is bf16 where the
    GPU multiplies bf16 natively (Ampere and later)."""
    if choice != "auto":
        return choice
    import torch

    if device != "cpu":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from bitsmith.kernels.cpu import fast_bf16_matmul

    return "bf16" if fast_bf16_matmul() else "fp32"


def parse_method(method: str, options: dict[str, Any]) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(quantizer, transforms, run options) for the user's ``method`` and ``options``.

    A method name that is a registered transform (``awq``) means that transform followed by the
    ``quantizer`` option's method (default rtn); a truthy option named after a transform adds it to
    any method. After a transform that clips (AWQ), the quantizer keeps plain min/max ranges
    unless ``clip_search`` is given (AutoAWQ's behaviour), so the run options (those the methods
    see and the checkpoint records) say so.
    """
    from bitsmith.transforms import TRANSFORMS

    # only a block transform (awq) is also a method spelling; a basis transform (rotate) is an option
    spelled = {name for name, t in TRANSFORMS.items() if t.changes_block}
    transforms = tuple(name for name in TRANSFORMS if (method == name and name in spelled) or options.get(name))
    if any(TRANSFORMS[t].changes_block for t in transforms):  # a basis transform (rotate) does not clip
        options = {"clip_search": False, **options}  # first key, as the checkpoints have always had it
    quantizer = str(options.get(QUANTIZER_OPTION, "rtn")) if method in spelled else method
    return quantizer, transforms, options


@dataclass(frozen=True)
class QuantizePlan:
    """What to quantize and how. Construct it with the user's terms (``method="awq"``,
    ``options={"awq": True}``); ``quantizer`` and ``transforms`` are derived (:func:`parse_method`)."""

    spec: QuantSpec
    method: str = "rtn"  # as the user spelled it; recorded in the checkpoint
    options: dict[str, Any] = field(default_factory=dict)  # as the user gave them
    quantize_head: bool = False  # also quantize lm_head (untied from the embedding if tied)
    quantize_embeddings: bool = False  # also quantize the input embedding (a tied head then shares it)
    unquantized_dtype: str = "fp16"  # storage for 2-D tensors left unquantized (embeddings, lm_head)
    layer_specs: dict[str, QuantSpec] = field(default_factory=dict)  # per-module overrides (mixed precision)
    compute_dtype: str = "fp32"  # block forwards and stored activations (calibrated runs)
    hessian_dtype: str = "fp32"  # GEMM dtype of the Hessian products, summed in fp32
    report_dtype: str = "bf16"  # products of the per-layer reports' output errors (pipeline.stages): bf16 fpmath or fp32
    calib: "CalibrationConfig | None" = None  # None: calibrate only when the method or a transform needs it
    batch_size: int = DEFAULT_BATCH_SIZE
    spill_bytes: int = DEFAULT_SPILL_BYTES
    replay_bytes: int = DEFAULT_REPLAY_BYTES
    device: str = "cpu"  # where calibrated runs compute (pipeline.device): cpu, cuda, cuda:N
    quantizer: str = field(init=False)  # the method that quantizes each layer
    transforms: tuple[str, ...] = field(init=False)  # applied to each block before the quantizer
    run_options: dict[str, Any] = field(init=False)  # ``options`` with the plan's defaults; recorded

    def __post_init__(self) -> None:
        from bitsmith.methods import METHODS
        from bitsmith.transforms import TRANSFORMS

        if self.report_dtype not in ("bf16", "fp32"):
            raise ValueError(f"report_dtype must be 'bf16' or 'fp32', got {self.report_dtype!r}")
        quantizer, transforms, run_options = parse_method(self.method, self.options)
        if quantizer not in METHODS:  # the user's spellings: quantizers and the transforms that imply one
            choices = sorted({*METHODS, *(n for n, t in TRANSFORMS.items() if t.changes_block)})
            raise ValueError(f"unknown method {quantizer!r}; choose one of {', '.join(choices)}")
        from bitsmith.transforms.rotate import check_combination

        check_combination(transforms)
        from bitsmith.methods.vq import check_method

        check_method(quantizer, self.spec, list(self.layer_specs.values()))
        object.__setattr__(self, "quantizer", quantizer)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "run_options", run_options)
        from bitsmith.pipeline.device import check_device, check_device_plan

        object.__setattr__(self, "device", check_device(self.device))
        check_device_plan(self.device, quantizer, transforms, self.needs_calibration)

    def quantizer_fn(self) -> "Method":
        """The quantizer as the pipelines call it: the method wrapped by any basis transform (rotate)."""
        from bitsmith.methods import get_method
        from bitsmith.transforms import wrapped_quantizer

        return wrapped_quantizer(get_method(self.quantizer), self.transforms, self.run_options)

    def spec_for(self, module: str) -> QuantSpec:
        return self.layer_specs.get(module, self.spec)

    def method_options(self) -> dict[str, Any]:
        """The options meant for the quantizer: without the plan's and the transforms' own."""
        from bitsmith.transforms import transform_option

        return {k: v for k, v in self.run_options.items() if k != QUANTIZER_OPTION and not transform_option(k)}

    def calibration_windows(self, samples: int, seq_len: int) -> list[int] | None:
        """The calibration sequences a calibrated run needs to run through the blocks, or None for all.

        When the quantizer reads no statistics for any of the plan's specs (``MethodInfo.reads_stats``: AWQ's
        final min/max RTN) and every block transform names the sequences its searches read
        (``Transform.windows``: AWQ's ~4,096 evenly spaced tokens), only those: the others would feed
        nothing but the per-layer reports' error figures. The transform then sees the same sequences as it
        would among all of them, so the checkpoint is the same (SmolLM2 AWQ w4g128: every tensor equal,
        8 of 128 sequences, 170 -> 102 s)."""
        from bitsmith.methods import method_info
        from bitsmith.transforms import get_transform

        reads = method_info(self.quantizer).reads_stats
        specs = {self.spec, *self.layer_specs.values()}
        if reads is None or any(reads(self.method_options(), s) for s in specs):
            return None
        transforms = [t for t in map(get_transform, self.transforms) if t.changes_block]
        if not transforms or any(t.windows is None for t in transforms):
            return None
        windows = sorted({i for t in transforms for i in t.windows(samples, seq_len, self.run_options)})
        return windows if len(windows) < samples else None

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is used when given, or when the quantizer or a transform needs it."""
        from bitsmith.methods import Needs, needs_calibration
        from bitsmith.transforms import get_transform

        calibrated_transform = any(get_transform(t).needs is not Needs.NOTHING for t in self.transforms)
        return self.calib is not None or calibrated_transform or needs_calibration(self.quantizer)

    def recorded_options(self) -> dict[str, Any]:
        """The options as the checkpoint records them (the calibrated run adds its calibration)."""
        return {**self.run_options, "quantize_head": self.quantize_head, "quantize_embeddings": self.quantize_embeddings,
                "unquantized_dtype": self.unquantized_dtype,
                **({"device": self.device} if self.device != "cpu" else {})}  # a CPU run records what it always did

    # -- the head/embedding policy: the tied-head rule lives here and nowhere else ---------------------
    def unties_head(self, tensor_names: list[str]) -> bool:
        """A tied head (no lm_head tensor in the source) is untied when the head alone is quantized:
        the embedding stays at full precision and the output projection gets its own quantized copy.
        Quantizing the embedding too keeps them tied (the head computes from the quantized embedding)."""
        return self.quantize_head and HEAD_WEIGHT not in tensor_names and not self.quantize_embeddings

    def quantizes_own_head(self, tensor_names: list[str]) -> bool:
        """Whether a head tensor is quantized on its own (not shared with a quantized embedding)."""
        return self.quantize_head and not (self.quantize_embeddings and HEAD_WEIGHT not in tensor_names)
