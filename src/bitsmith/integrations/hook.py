"""Register bitsmith with transformers without importing transformers at ``import bitsmith``.

``import bitsmith`` must stay torch-free, yet ``AutoModelForCausalLM.from_pretrained(<bitsmith
checkpoint>)`` must find bitsmith's quantizer with no other step. transformers looks quantizers up in
``transformers.quantizers.auto`` (imported lazily, the first time a model is loaded), so:

- if that module is already imported, register now;
- otherwise put a one-shot finder on ``sys.meta_path`` that wraps the module's loader and registers
  right after the module has executed, whichever of the two libraries the user imported first.

The same finder waits for ``transformers.modeling_utils`` (which imports the quantizer table half-way
through its own execution): once it has executed, the integration wraps ``from_pretrained`` so that an
old bitsmith checkpoint without a ``quantization_config`` is an error rather than random weights.

A failure to register is logged, never raised: it must not break the user's ``import transformers``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType

TARGET = "transformers.quantizers.auto"
MODELING = "transformers.modeling_utils"  # defines PreTrainedModel.from_pretrained, which the guard wraps
INTEGRATION = "bitsmith.integrations.transformers"  # registers itself when imported

log = logging.getLogger(__name__)


def register_now() -> bool:
    """Register bitsmith's quantizer with the (already importable) transformers, and guard from_pretrained
    when transformers' modeling module is complete; False on failure."""
    try:
        module = sys.modules.get(INTEGRATION)  # imported or being imported (it imports transformers)
        if module is None:
            import bitsmith.integrations.transformers as module  # registers (and guards) on import
        guard = getattr(module, "guard_when_ready", None)  # absent while the module is still executing
        if guard is not None:
            guard()
        return True
    except Exception as exc:  # noqa: BLE001 - an integration must never break the host library's import
        log.warning("bitsmith could not register its transformers quantizer (%s: %s); load bitsmith "
                    "checkpoints with bitsmith.load(path)", type(exc).__name__, exc)
        return False


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then registers bitsmith; everything else is the wrapped loader's."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        register_now()

    def __getattr__(self, name: str):  # get_source, is_package, ... for tracebacks and inspect
        return getattr(self._inner, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for each pending module it asks the other finders, then wraps the loader."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, fullname: str, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)  # one shot per module: later imports (a reload) see the plain module
        if not self.pending:
            remove_finder()
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImportFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImportFinder)]


def install() -> None:
    """Register now if transformers' quantizer table is loaded, else once it is; the same for the
    from_pretrained guard and transformers' modeling module (idempotent)."""
    if TARGET in sys.modules:
        register_now()
    pending = {name for name in (TARGET, MODELING) if name not in sys.modules}
    if pending and not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder(pending))
