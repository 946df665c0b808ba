"""What a sweep is: the variants (method x spec), the evaluation settings, and the resources a task
declares. Torch-free: parsing and checking happen before any work, so a typo in ``--specs`` costs
nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitsmith.spec import QuantSpec, SpecError

__all__ = ["Variant", "SweepConfig", "SweepError", "expand_variants", "task_memory_bytes", "MIN_TASK_MEMORY"]


class SweepError(ValueError):
    """A sweep cannot run as asked (bad variants, a folder of another sweep, Ray missing); the
    message says what to change."""


@dataclass(frozen=True, order=True)
class Variant:
    """One point of the sweep: a quantization method at a spec."""

    method: str
    spec: str  # canonical spelling (str(QuantSpec))

    @property
    def name(self) -> str:
        """``w4g128-hqq``: also the file name of its result and checkpoint, so only [a-z0-9-]."""
        return f"{self.spec}-{self.method}"


def expand_variants(specs: list[str], methods: list[str]) -> tuple[Variant, ...]:
    """Every method at every spec, in the order given (duplicates dropped); each spec and method is
    checked here, before any work."""
    from bitsmith.methods import METHODS
    from bitsmith.transforms import TRANSFORMS

    if not specs or not methods:
        raise SweepError("a sweep needs at least one spec and one method, e.g. --specs w8,w4g128 --methods rtn,hqq")
    parsed = []
    for text in specs:
        try:
            parsed.append(str(QuantSpec.parse(text)))
        except SpecError as exc:
            raise SweepError(f"--specs: {exc}") from exc
    known = {*METHODS, *TRANSFORMS}  # awq is a transform with a quantizer behind it
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SweepError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(known))}")
    seen: dict[Variant, None] = {}
    for method in methods:
        for spec in parsed:
            seen.setdefault(Variant(method, spec))
    return tuple(seen)


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep's results depend on (``key``) plus how it is run (not in the key)."""

    model: str
    variants: tuple[Variant, ...]
    domains: tuple[str, ...] = ("prose", "code")  # --text specs: built-in names or [NAME=]PATH
    ctx: int = 512
    max_windows: int | None = None
    max_chars: int = 60_000
    cache_topk: int = 256
    calib_samples: int = 128  # calibrated methods only
    calib_len: int = 512
    keep_checkpoints: bool = False
    method_options: tuple[tuple[str, object], ...] = ()  # e.g. (("clip_search", False),): every variant
    # how it runs (never changes a result)
    workers: int = 2
    threads_per_task: int = 1
    memory_per_task: int | None = None  # bytes; None: estimated from the model size
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes for the report

    def key(self, model_id: str, text_ids: dict[str, str]) -> dict:
        """What must match for a stored result to be reused: the model's identity on disk, each
        domain's text, the windows and calibration settings (the variant is the file name)."""
        return {"model": model_id, "texts": dict(sorted(text_ids.items())), "ctx": self.ctx,
                "max_windows": self.max_windows, "cache_topk": self.cache_topk,
                "calib": [self.calib_samples, self.calib_len], "options": dict(self.method_options), "version": 1}


MIN_TASK_MEMORY = 1_000_000_000  # the interpreter, torch and transformers alone take ~0.6 GB


def task_memory_bytes(n_params: int, vocab: int, ctx: int) -> int:
    """The memory one task declares: a float32 copy of the model (the calibration-free pipeline holds
    one tensor at a time, but scoring loads the packed model with its float embeddings, and the
    calibrated pipeline one block plus activations: fp32 of everything bounds all three), a window's
    logits a few times over (log-softmax, top-k gather), and the interpreter with its libraries."""
    logits = 4 * ctx * vocab * 4
    return int(4 * n_params + logits + MIN_TASK_MEMORY)
