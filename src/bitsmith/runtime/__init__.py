"""Running a model bitsmith understands: :mod:`~bitsmith.runtime.load` (``load_model``),
:mod:`~bitsmith.runtime.install` (swap quantized modules into a model),
:mod:`~bitsmith.runtime.offload` (stream decoder blocks under a memory budget) and
:mod:`~bitsmith.runtime.options` (``RuntimeOptions``: kernel, int8 decode, KV cache, ... passed down
explicitly). Import the submodules directly; this package imports nothing, so ``import bitsmith``
stays torch-free and the kernels can use the options without a cycle."""
