"""``bitsmith probe``: how far an OpenAI-compatible endpoint is from a reference model run locally, and
where that distance sits on the reference's own quantization ladder (w8 / w4g128 / w3g128 / w2g64).

- :mod:`bitsmith.probe.endpoint`: the HTTP side (which logprob API the server speaks, the requests, parsing);
- :mod:`bitsmith.probe.divergence`: top-k KL (a lower bound), top-1 agreement, the paired bootstrap;
- :mod:`bitsmith.probe.ladder`: the reference's rungs on the same positions, with the same truncation, cached;
- :mod:`bitsmith.probe.verdict`: placing a measurement on the ladder, and spotting a different model;
- :mod:`bitsmith.probe.run`: the pipeline that ties them together.
"""
