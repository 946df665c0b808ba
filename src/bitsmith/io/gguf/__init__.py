"""GGUF, the file format of llama.cpp, in one package: read a header (:mod:`.header`), map tensor
names (:mod:`.names`), choose llama.cpp's per-tensor types (:mod:`.mixes`), encode tensors
(:mod:`.encode`), write files (:mod:`.export`), read quantized matrices back as bitsmith codes
(:mod:`.quantized`) and describe a file (:mod:`.inspect`).

The package imports nothing itself: each module is imported where it is used, so ``import bitsmith``
stays free of torch and gguf-py.
"""
