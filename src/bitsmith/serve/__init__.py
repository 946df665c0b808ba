"""``bitsmith serve``: an OpenAI-compatible HTTP server with continuous batching over the packed model.

- :mod:`~bitsmith.serve.batch`: one decode step for many sequences (batched linears, per-sequence attention);
- :mod:`~bitsmith.serve.sampling`: token choice, log-probabilities, text with stop strings;
- :mod:`~bitsmith.serve.scheduler`: the thread that admits, prefills and steps requests (bounded queue);
- :mod:`~bitsmith.serve.schemas`, :mod:`~bitsmith.serve.requests`, :mod:`~bitsmith.serve.responses`: the API's
  bodies, checks and replies; :mod:`~bitsmith.serve.app`: the FastAPI routes;
- :mod:`~bitsmith.serve.server`: building the engine from a model and running uvicorn (also in a thread).

Nothing here is imported by ``import bitsmith`` (torch and FastAPI load only when serving).
"""
