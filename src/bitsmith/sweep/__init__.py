"""``bitsmith sweep``: which quantization to use, answered by quantizing and scoring many variants.

Every (method, spec) variant of a model is quantized and scored per evaluation domain against one
cached reference, as independent tasks behind an executor seam (:mod:`bitsmith.sweep.executor`:
in-process serial, or Ray for a local pool or a cluster). Finished variants are stored on disk one
file each, atomically, so a re-run after a crash runs only what is missing
(:mod:`bitsmith.sweep.store`). The report (:mod:`bitsmith.sweep.report`) holds size vs KLD per
domain, the Pareto frontier and a recommendation (:mod:`bitsmith.sweep.frontier`).

Modules, bottom to top: ``config`` (what a sweep is), ``frontier`` (pure selection logic),
``store`` (results on disk), ``task`` (one variant's work), ``executor``, ``report``, ``driver``.
"""
