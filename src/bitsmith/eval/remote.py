"""Code tasks answered by llama.cpp's ``llama-server`` instead of a local model.

:func:`make_server_complete_many` is a ``complete_many`` for :func:`bitsmith.eval.humaneval.pass_at_1`
over the server's native ``/completion`` endpoint. The prompts are made here, by bitsmith's tokenizer
and chat template (:func:`bitsmith.infer.generate.prompt_token_ids`), and sent as **token ids**; the
server decodes greedily (top-k 1, temperature 0, no repetition penalties) and returns the generated ids,
which the same tokenizer decodes and :func:`bitsmith.eval.tasks.cut_at_stop` cuts as a local run cuts its
own. So a HumanEval column measured this way differs from a local one only in the model.

Stop strings: the server is asked to stop at them, so it does not spend its budget after the answer.
A chat reply's stop (:data:`bitsmith.eval.humaneval.FENCE_END`) counts only after an opening fence,
which the server cannot tell, so it is sent as ``FENCE_END + "\\n"`` (a closing fence ends its line; an
opening fence carries a language name). When the server still stopped where the cut finds no stop (a
bare opening fence), the request is continued from the tokens so far: greedy decoding gives the same
tokens as if it had not stopped.

Several prompts are in flight at once (``parallel``, one per server slot: ``llama-server --parallel``),
so the server batches them; the replies are reported to ``on_done`` as they finish and returned in
prompt order. :func:`check_prompts` asks the server what it received (its prompt token count and its
detokenized prompt) to show that it was fed exactly bitsmith's tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerError", "ServerStats", "PromptCheck", "server_stops", "completion_body",
           "make_server_complete_many", "check_prompts"]

CompleteMany = Callable[[list[str], int, list[str], Callable[[int, str], None] | None], list[str]]


class ServerError(RuntimeError):
    """The server could not be reached, refused a request, or answered in a shape it should not."""


@dataclass
class ServerStats:
    """What the server did for a run, summed over its requests (filled in by the caller's thread)."""

    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens the server counted (tokens_evaluated)
    cached_tokens: int = 0  # of those, reused from its prompt cache instead of computed
    generated_tokens: int = 0
    continued: int = 0  # requests that continued a reply the server had stopped too early


@dataclass(frozen=True)
class PromptCheck:
    """One prompt as bitsmith made it and as the server says it received it."""

    sent_tokens: int
    server_tokens: int  # the server's tokens_evaluated
    same_text: bool  # the server's detokenized prompt equals bitsmith's decode of the sent ids

    @property
    def ok(self) -> bool:
        return self.sent_tokens == self.server_tokens and self.same_text


def server_stops(stop: Sequence[str]) -> list[str]:
    """The stop strings to send: a chat reply's fence stop made one the server cannot hit early."""
    from bitsmith.eval.humaneval import FENCE_END

    return [s + "\n" if s == FENCE_END else s for s in stop if s]


def completion_body(ids: list[int], n_predict: int, stop: Sequence[str]) -> dict[str, Any]:
    """A greedy ``/completion`` request for the prompt ``ids`` that returns the generated ids."""
    return {"prompt": list(ids), "n_predict": n_predict, "stop": list(stop), "stream": False,
            "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "return_tokens": True, "cache_prompt": True}


def post_completion(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST ``body`` to ``url``/completion; the reply's JSON, or a :class:`ServerError` saying why not."""
    import httpx

    try:
        reply = httpx.post(url.rstrip("/") + "/completion", json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {url}/completion: {exc or type(exc).__name__}; is llama-server "
                          "running at that address?") from None
    try:
        data = reply.json()
    except ValueError:
        data = None
    if reply.status_code != 200:
        message = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(data.get("error"), dict) else None
        raise ServerError(f"{url}/completion answered {reply.status_code}: {message or reply.text[:200]!r}")
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise ServerError(f"{url}/completion answered without the generated token ids ('tokens'); it needs a "
                          "llama-server that honours return_tokens")
    return data


def _generate(url: str, ids: list[int], max_new_tokens: int, stop: list[str], cut: Callable[[list[int]], bool],
              timeout_s: float) -> tuple[list[int], list[dict[str, Any]]]:
    """The greedy reply's ids for one prompt, continuing while the server stopped at a stop string that
    ``cut`` does not find; also every raw answer (for the counts)."""
    generated: list[int] = []
    answers: list[dict[str, Any]] = []
    while len(generated) < max_new_tokens:
        data = post_completion(url, completion_body(ids + generated, max_new_tokens - len(generated), stop), timeout_s)
        answers.append(data)
        new = [int(t) for t in data["tokens"]]
        generated += new
        if data.get("stop_type") != "word" or not new or cut(generated):
            break
    return generated, answers


def make_server_complete_many(url: str, tokenizer: Any, chat: bool, parallel: int = 8, timeout_s: float = 3600.0,
                              stats: ServerStats | None = None) -> CompleteMany:
    """A greedy ``complete_many`` answered by the llama-server at ``url`` (``http://host:port``), with
    ``parallel`` requests in flight; each reply decoded by ``tokenizer`` and cut at its first stop string."""
    from bitsmith.eval.tasks import cut_at_stop
    from bitsmith.infer.generate import prompt_token_ids

    if parallel < 1:
        raise ValueError(f"parallel must be at least 1 request at a time, got {parallel}")

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def complete_many(prompts: list[str], max_new_tokens: int, stop: list[str],
                      on_done: Callable[[int, str], None] | None = None) -> list[str]:
        encoded = [prompt_token_ids(tokenizer, p, chat) for p in prompts]
        sent_stop = server_stops(stop)

        def cut(ids: list[int]) -> bool:
            return bool(stop) and cut_at_stop(decode(ids), stop)[1]

        replies = [""] * len(prompts)
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="llama-server")
        try:
            futures = {pool.submit(_generate, url, ids, max_new_tokens, sent_stop, cut, timeout_s): i
                       for i, ids in enumerate(encoded) if max_new_tokens > 0}
            for future in as_completed(futures):  # in this thread: on_done and the counts, one at a time
                index = futures[future]
                ids, answers = future.result()
                replies[index] = cut_at_stop(decode(ids), stop)[0]
                _count(stats, answers)
                if on_done is not None:
                    on_done(index, replies[index])
        finally:  # after an error, requests not yet sent are dropped rather than sent to a failing server
            pool.shutdown(wait=True, cancel_futures=True)
        return replies

    return complete_many


def _count(stats: ServerStats | None, answers: list[dict[str, Any]]) -> None:
    if stats is None:
        return
    stats.requests += len(answers)
    stats.continued += len(answers) - 1
    for data in answers:
        stats.prompt_tokens += int(data.get("tokens_evaluated") or 0)
        stats.cached_tokens += int((data.get("timings") or {}).get("cache_n") or 0)
        stats.generated_tokens += len(data["tokens"])


def check_prompts(url: str, tokenizer: Any, prompts: Sequence[str], chat: bool, timeout_s: float = 600.0) -> list[PromptCheck]:
    """Send each prompt's ids for one token and compare what the server reports it received (its prompt
    token count and detokenized prompt) with what bitsmith sent."""
    from bitsmith.infer.generate import prompt_token_ids

    checks = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt, chat)
        data = post_completion(url, completion_body(ids, 1, []), timeout_s)
        echoed = data.get("prompt")
        checks.append(PromptCheck(len(ids), int(data.get("tokens_evaluated") or -1),
                                  echoed == tokenizer.decode(ids, skip_special_tokens=False)))
    return checks
