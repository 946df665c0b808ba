"""Recovery by distillation: after quantization, tune a checkpoint's continuous parameters (scales,
zeros, norm weights; codes frozen) so its logits match the unquantized model's on calibration text.

- :mod:`bitsmith.recover.distillation`: the resumable, monotone end-to-end KL loop (``bitsmith distill``);
- :mod:`bitsmith.recover.tunable`: the trainable view of a loaded checkpoint;
- :mod:`bitsmith.recover.output`: the distilled checkpoint writer.
"""

from bitsmith.recover.distillation import DistillConfig, DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill"]
