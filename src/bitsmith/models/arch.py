"""Architecture as data: build any causal LM from a source, and find its blocks and linears.

Nothing here knows a model family. The decoder blocks are the longest ``ModuleList`` of
identically-typed modules; the linears of a block are put in execution order by a small table of
name patterns (:data:`bitsmith.models.family.LINEAR_ORDER`: attention q, k, v, o, then mlp gate,
up, down), falling back to module order.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bitsmith.models.errors import ModelSourceError
from bitsmith.models.family import ATTENTION_HINT, LINEAR_ORDER
from bitsmith.models.hf import causal_lm_class
from bitsmith.models.sources import ModelSource

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device while buffers stay real.

    Rotary ``inv_freq`` and similar non-persistent buffers are computed in ``__init__`` and are
    not in any checkpoint; building them for real here keeps them right without knowing the model.
    Parameter storage is allocated with ``torch.empty`` (untouched pages) and dropped at once.
    """
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_model(
    source: ModelSource,
    dtype: torch.dtype | None = None,
    *,
    skip: Callable[[str], bool] | None = None,
) -> nn.Module:
    """The transformers causal LM of ``source`` with its weights loaded, in eval mode.

    Parameters named by ``skip`` stay on the meta device for the caller to fill (e.g. one block at
    a time). A missing ``lm_head.weight`` (or a config that ties) ties the head to the input
    embedding; a caller that skips the embedding and later replaces its parameter re-ties with
    ``model.tie_weights()``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    causal_lm_class(source.config)  # a clear error for an unsupported architecture
    config = copy.deepcopy(source.config)  # from_config writes into the config it is given
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    available = set(source.tensor_names())
    embed_name, head_name = _embedding_and_head(model)
    wanted = dict(model.named_parameters(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    wanted.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n in persistent})
    tie = head_name is not None and (
        head_name not in available or bool(getattr(source.config, "tie_word_embeddings", False))
    )
    missing = []
    for name in wanted:
        if (skip is not None and skip(name)) or (tie and name == head_name):
            continue
        if name not in available:
            missing.append(name)
            continue
        set_tensor(model, name, load_checked(source, name, wanted[name].shape, dtype))
    if missing:
        raise ModelSourceError(
            f"{source.path.name} lacks {len(missing)} tensor(s) the {source.config.model_type} model "
            f"needs (first: {missing[0]}); the file is incomplete or its architecture is mislabelled"
        )
    # Tensors of skipped modules (e.g. a checkpoint's packed qweight/scale) are the caller's to use.
    unused = sorted(n for n in available - set(wanted) if skip is None or not skip(n))
    if unused:
        log.warning("%s: %d tensor(s) not used by the model, e.g. %s", source.path.name, len(unused), unused[0])
    if tie:
        _tie_head(model, source, embed_name, head_name, skip)
    model.eval()
    return model


def load_checked(source: ModelSource, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    tensor = source.load_tensor(name)
    if tuple(tensor.shape) != tuple(shape):
        raise ModelSourceError(
            f"tensor {name} in {source.path.name} has shape {tuple(tensor.shape)} but the config "
            f"asks for {tuple(shape)}; config.json does not match the weights"
        )
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` (meta or not) by ``tensor``."""
    from torch import nn

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _tie_head(
    model: nn.Module, source: ModelSource, embed_name: str, head_name: str,
    skip: Callable[[str], bool] | None,
) -> None:
    """Make the output head share the input embedding's parameter (the file has no head)."""
    head_module = model.get_submodule(head_name.rpartition(".")[0])
    embed = model.get_submodule(embed_name.rpartition(".")[0])
    if skip is not None and skip(embed_name) and not skip(head_name):
        raise ModelSourceError(
            f"{head_name} is tied to {embed_name}; skip both or neither"
        )
    head_module.weight = embed.weight
    model.config.tie_word_embeddings = True
    source.config.tie_word_embeddings = True  # so a saved config.json says so too


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose members all have one type."""
    from torch import nn

    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ModelSourceError(
            f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of identical "
            "modules); this architecture is not supported"
        )
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Relative name -> ``nn.Linear`` in ``block``, attention q, k, v, o then mlp gate, up, down."""
    from torch import nn

    found = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def rank(item: tuple[int, tuple[str, nn.Linear]]) -> tuple[int, int, int]:
        position, (name, _) = item
        last = name.rsplit(".", 1)[-1]
        for r, pattern in enumerate(LINEAR_ORDER):
            if re.search(pattern, last):
                # one-letter names (q, k, v) only count inside an attention module
                if len(last) > 1 or ATTENTION_HINT.search(name):
                    return (0, r, position)
        return (1, 0, position)

    ordered = sorted(enumerate(found), key=rank)
    return {name: module for _, (name, module) in ordered}


def embedding_and_head_names(model: nn.Module) -> tuple[str, str | None]:
    """Names of the input embedding weight and the lm_head weight (None when tied to it)."""
    embed_name, head_name = _embedding_and_head(model)
    if head_name is None or model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        return embed_name, None
    return embed_name, head_name


def _embedding_and_head(model: nn.Module) -> tuple[str, str | None]:
    """Weight names of the input embedding and of the output head module, tied or not."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    embed_name = f"{names[id(embed)]}.weight"
    return embed_name, (None if head is None else f"{names[id(head)]}.weight")
