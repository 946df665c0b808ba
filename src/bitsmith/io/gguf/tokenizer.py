"""``tokenizer.ggml.*`` keys from Hugging Face tokenizer files, through gguf-py's vocab readers.

Byte-level BPE -> ``gpt2`` with merges, byte-fallback BPE -> ``llama`` (SentencePiece-style); any
other tokenizer -> ``gpt2`` with its tokens and no merges (llama.cpp then tokenizes badly: such a
file is for tensors and tests, a warning says so). One entry per embedding row: the vocabulary is
padded as llama.cpp's converter pads it, or cut where tokens were added past the embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from bitsmith.models.family import GGUF_PRE_TOKENIZERS as PRE_TOKENIZER  # tokenizer.ggml.pre by model_type (else "default")


def read_vocab(folder: Path) -> tuple[Any, list[Any], list[float], list[Any], str]:
    """(gguf-py vocab or None, tokens, scores, token types, tokenizer model) of the HF files in ``folder``."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    for cls in (BpeVocab, LlamaHfVocab):
        try:
            vocab = cls(folder)
        except (FileNotFoundError, TypeError):
            continue
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
        return vocab, tokens, scores, types, vocab.tokenizer_model
    from transformers import AutoTokenizer

    log.warning("%s: tokenizer is neither byte-level nor byte-fallback BPE; writing its tokens without merges", folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    special = set(tok.all_special_tokens)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    return None, tokens, [], types, "gpt2"


def write_tokenizer(writer: Any, folder: Path, model_type: str, n_vocab: int) -> None:
    """Add the vocabulary of the tokenizer files in ``folder``, one entry per embedding row."""
    import gguf
    from gguf.vocab import SpecialVocab

    vocab, tokens, scores, types, model = read_vocab(folder)
    if model == "gpt2":
        scores = [-float(i) for i in range(len(tokens))]  # ranks: readers rebuild merges when there are none
    # pad as llama.cpp's converter does, or cut tokens added past the embedding (no vector to look up)
    pad = range(len(tokens), n_vocab)
    tokens = [t.encode() if isinstance(t, str) else t for t in tokens][:n_vocab] + [f"[PAD{i}]".encode() for i in pad]
    types = [int(t) for t in types][:n_vocab] + [int(gguf.TokenType.UNUSED)] * len(pad)
    scores = [float(x) for x in scores][:n_vocab] + [-1000.0] * len(pad)
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        writer.add_tokenizer_pre(PRE_TOKENIZER.get(model_type, "default") if vocab is not None else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=model == "gpt2" and vocab is not None, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
