"""An lm-evaluation-harness model (``lm_eval.api.model.TemplateLM``) over a torch causal LM and its
tokenizer: what bitsmith hands the harness when its own ``HFLM`` cannot be built (HFLM imports
``accelerate``, which a CPU install may lack). The three request types, written plainly:

- ``loglikelihood``: one forward over context + continuation (left-truncated to ``max_length``),
  the continuation's summed log-probabilities and whether every continuation token is the argmax;
- ``loglikelihood_rolling``: the whole text scored in windows of ``max_length`` tokens, each window
  conditioned on the token before it (the first on the end-of-text token);
- ``generate_until``: greedy decoding (the model's own ``generate``), cut at the first stop string.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from bitsmith.eval.tasks import cut_at_stop


class TorchLM(TemplateLM):
    """The harness's view of ``model`` (a transformers causal LM, quantized layers and all)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int = 2048) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, limit)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(torch.tensor([tokens])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]  # inputs; the last token is only a target
            n = len(continuation)
            logprobs = self._logprobs(tokens)[-n:]
            target = torch.tensor(continuation)
            score = float(logprobs.gather(1, target[:, None]).sum())
            results.append((score, bool(torch.equal(logprobs.argmax(-1), target))))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            total, start = 0.0, 0
            while start < len(tokens):
                window = tokens[start:start + self.max_length]
                prefix = [tokens[start - 1] if start else self.prefix_token_id]
                logprobs = self._logprobs(prefix + window[:-1])
                total += float(logprobs.gather(1, torch.tensor(window)[:, None]).sum())
                start += len(window)
            results.append(total)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - budget):]
            with torch.no_grad():
                out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=budget, do_sample=False, pad_token_id=self.eot_token_id)
            text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            results.append(cut_at_stop(text, until)[0])
        return results
