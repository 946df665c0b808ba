"""Tiny random models written as Hugging Face folders, built in-process for tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "big", "small", ".", ","]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [f"w{i}" for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_config(arch: str = "llama", **overrides):
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tiny_tokenizer()), max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "gemma3_text":
        kw.update(head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def sample_text(n_words: int = 600, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
    return " ".join(WORDS[i] for i in idx)


def sample_text_file(folder: Path, n_words: int = 600, seed: int = 0) -> Path:
    """``sample_text`` written to ``folder/calib.txt`` (a calibration or evaluation text file)."""
    path = Path(folder) / "calib.txt"
    path.write_text(sample_text(n_words, seed))
    return path
