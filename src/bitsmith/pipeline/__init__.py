"""The quantize pipeline: a source model and a frozen plan in, a bitsmith checkpoint out.

- :mod:`~bitsmith.pipeline.plan`: :class:`QuantizePlan`, everything a run does (parses the method spelling once);
- :mod:`~bitsmith.pipeline.quantize`: :func:`quantize`, the one entry point, and the calibration-free loop;
- :mod:`~bitsmith.pipeline.layerwise`: the calibrated loop over decoder blocks (resumable);
- :mod:`~bitsmith.pipeline.stages`: one true-sequential stage of a block: statistics, quantization, reports;
- :mod:`~bitsmith.pipeline.capture`, :mod:`~bitsmith.pipeline.replay`, :mod:`~bitsmith.pipeline.workstate`:
  block inputs, replay of finished sub-modules, the resumable work folder;
- :mod:`~bitsmith.pipeline.common`: what both loops share (layers, storage dtypes, reports, folder).

Nothing is imported here, so ``import bitsmith.pipeline`` stays light.
"""
