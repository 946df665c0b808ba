"""GGUF, the file format of llama.cpp, in one package: read a header (:mod:`.header`), map tensor
names (:mod:`.names`), choose llama.cpp's per-tensor types (:mod:`.mixes`), encode tensors
(:mod:`.encode`), write files (:mod:`.export`), read quantized matrices back as bitsmith codes
(:mod:`.quantized`) and describe a file (:mod:`.inspect`).

Errors: :class:`~bitsmith.io.gguf.header.GGUFError` for a file that cannot be read,
:class:`~bitsmith.io.gguf.mixes.ExportError` for an export that cannot be done as asked.

The package imports nothing itself: each module is imported where it is used, so ``import bitsmith``
stays free of torch and gguf-py.
"""
