"""transformers' ``from_pretrained`` on a bitsmith checkpoint, through its public quantizer registry.

After ``import bitsmith`` (:mod:`bitsmith.integrations.hook` calls :func:`register`),
``AutoModelForCausalLM.from_pretrained(CKPT)`` reads the checkpoint's ``quantization_config``
(``quant_method: "bitsmith"``, :mod:`bitsmith.io.quant_config`) and this quantizer:

1. before the weights load, strips each quantized module's ``weight`` and gives it the parameters a
   checkpoint stores (``qweight`` uint8, ``scale``/``zero``/``grid`` fp16), so transformers' own loader
   fills them from the shards at their stored dtypes;
2. after, swaps each such module for the one bitsmith's loader builds (:func:`install_quantized`:
   QuantLinear from the packed codes, QuantEmbedding, a tied head computing from the embedding's
   codes), so the logits are those of :func:`bitsmith.runtime.load.load_model`;
3. on ``save_pretrained``, gives back the packed tensors under the same names (a bitsmith layout that
   loads again the same way).

CPU only (``device_map`` None or cpu; move a loaded model with ``.to("cuda")``), float dtypes
float32/bfloat16/float16, inference only; ``BITSMITH_*`` variables choose kernels as for ``bitsmith.load``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                         register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitsmith.formats.packing import packed_row_bytes
from bitsmith.io.checkpoint import shard_version
from bitsmith.io.quant_config import (CONFIG_VERSION, LOAD_HINT, QUANT_METHOD, SHARD_MARK, TRIPWIRE, TRIPWIRE_KEY,
                                      QuantConfigError, expand, is_bitsmith_shard)
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PARTS = ("qweight", "scale", "zero", "grid")  # what a checkpoint stores per quantized layer


class BitsmithConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a bitsmith checkpoint, as transformers holds it."""

    def __init__(self, spec: str = "", modules: list[str] | None = None, overrides: dict[str, str] | None = None,
                 method: str = "", format_version: str = CONFIG_VERSION, load_with: str = LOAD_HINT, **kwargs) -> None:
        kwargs.pop("quant_method", None)
        if str(format_version) != CONFIG_VERSION:
            raise QuantConfigError(f"this checkpoint's quantization_config is bitsmith format {str(format_version)[:40]}; "
                                   f"this bitsmith reads format {CONFIG_VERSION}: upgrade bitsmith")
        self.quant_method = QUANT_METHOD
        self.format_version = CONFIG_VERSION
        self.method, self.spec, self.load_with = method, spec, load_with
        self.modules = list(modules or [])
        self.overrides = dict(overrides or {})
        for key, value in kwargs.items():  # fields a newer writer added: kept, so save_pretrained keeps them
            setattr(self, key, value)


def _device_of(entry: object) -> str:
    """The device type a device_map entry names ("disk" included; an int is an accelerator index)."""
    if isinstance(entry, torch.device):
        return entry.type
    if isinstance(entry, str):
        try:
            return torch.device(entry).type
        except RuntimeError:
            return entry
    return f"accelerator {entry}"


def check_device_map(device_map: object) -> None:
    """Refuse a device_map that places anything off the CPU (the packed layers load on the CPU)."""
    if device_map is None:
        return
    entries = device_map.values() if isinstance(device_map, Mapping) else [device_map]
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        bad = device_map
    else:
        bad = next((str(e) for e in entries if _device_of(e) != "cpu"), None)
    if bad is not None:
        raise ValueError(f"device_map={device_map!r} places bitsmith layers on {bad!r}; transformers loads a bitsmith "
                         "checkpoint on the CPU only: leave device_map out (or 'cpu'), then move the model with "
                         "model.to('cuda') (the packed codes move and stay packed)")


def part_shapes(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The stored tensors of one quantized [out, in] layer and their shapes (QuantizedTensor.to_state)."""
    groups = spec.groups_per_row(in_features)
    shapes = {"qweight": (out_features, packed_row_bytes(in_features, spec.bits)), "scale": (out_features, groups)}
    if spec.has_zero:
        shapes["zero"] = (out_features, groups)
    if spec.grid != "uniform":
        shapes["grid"] = (2 ** spec.bits,)
    return shapes


def _shape(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise QuantConfigError(f"the bitsmith quantization_config quantizes {name}, a {type(module).__name__}; only linear "
                           "layers and embeddings are quantized: config.json does not match the model")


def strip_weight(module: nn.Module) -> None:
    """Drop a module's weight parameter, leaving an empty placeholder that transformers' weight
    initialisation (``init.normal_(module.weight)`` for embeddings) sees as already initialised."""
    module._parameters.pop("weight", None)
    placeholder = torch.empty(0)
    placeholder._is_hf_initialized = True
    module.weight = placeholder


def make_slots(model: nn.Module, specs: Mapping[str, QuantSpec]) -> dict[str, tuple[int, int]]:
    """Strip each quantized module's weight and register meta parameters for its stored tensors;
    returns name -> (out, in)."""
    shapes = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        shapes[name] = _shape(module, name)
        strip_weight(module)
        for part, shape in part_shapes(spec, *shapes[name]).items():
            dtype = torch.uint8 if part == "qweight" else torch.float16
            module.register_parameter(part, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False))
    return shapes


def stored_specs(checkpoint_files: list[str] | None) -> dict[str, str]:
    """module -> spec as the shard headers of a bitsmith checkpoint record them ({} for other files)."""
    from bitsmith.io.safetensors import read_header

    found: dict[str, str] = {}
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            continue
        raw = read_header(path).metadata.get("quantization")
        if raw:
            found.update({n: e.get("spec") for n, e in json.loads(raw).get("tensors", {}).items()})
    return found


def _tied_head(model: nn.Module, specs: Mapping[str, QuantSpec]) -> str | None:
    """The output head's module name when it computes from a quantized input embedding's codes."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or head is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head_name, embed_name = names.get(id(head)), names.get(id(embed))
    return head_name if embed_name in specs and head_name not in specs else None


class BitsmithHfQuantizer(HfQuantizer):
    """Loads bitsmith checkpoints; it never quantizes (use ``bitsmith.quantize`` or ``bitsmith quantize``)."""

    requires_calibration = True  # transformers then refuses pre_quantized=False, i.e. quantizing a float model

    def __init__(self, quantization_config: BitsmithConfig, **kwargs) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError("transformers cannot quantize with bitsmith's config: quantize with bitsmith.quantize(model, out, "
                             "spec) or `bitsmith quantize MODEL --spec w4g128 --out DIR`, then from_pretrained(DIR)")
        super().__init__(quantization_config, **kwargs)
        self.specs: dict[str, QuantSpec] = {}
        self.tied_head: str | None = None

    def validate_environment(self, *args, device_map: object = None, **kwargs) -> None:
        check_device_map(device_map)

    def update_attn_implementation(self, config):  # type: ignore[no-untyped-def]
        """Clear the tripwire that stops transformers without bitsmith (io/quant_config.py), and make
        ``dtype="auto"`` (transformers' default) float32 as in ``bitsmith.load``: a checkpoint's config
        often names no dtype, and transformers would then take its first stored float tensor's, the
        fp16 of an unquantized embedding. Both run before transformers reads either field."""
        if getattr(config, TRIPWIRE_KEY, None) == TRIPWIRE:
            setattr(config, TRIPWIRE_KEY, None)
        config.dtype = torch.float32
        return config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype} is not one bitsmith computes in; use torch.float32 (bitsmith.load's default), "
                             "torch.bfloat16 or torch.float16")
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs) -> None:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        self.specs = expand(self.quantization_config.to_dict(), names)
        stored = stored_specs(checkpoint_files)
        differ = sorted(n for n in set(stored) | set(self.specs) if stored and stored.get(n) != str(self.specs.get(n)))
        if differ:
            raise QuantConfigError(f"config.json's quantization_config and the checkpoint's shards disagree on {differ[0]} "
                                   f"({self.specs.get(differ[0])} vs {stored.get(differ[0])}); the folder mixes two "
                                   "checkpoints: quantize again")
        self.tied_head = _tied_head(model, self.specs)
        make_slots(model, self.specs)
        if self.tied_head is not None:  # the head computes from the embedding's codes: no weight of its own
            strip_weight(model.get_submodule(self.tied_head))
            tied = getattr(model, "all_tied_weights_keys", None)
            if isinstance(tied, dict):
                tied.pop(f"{self.tied_head}.weight", None)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        from bitsmith.runtime.install import QuantizedLayer, install_quantized
        from bitsmith.runtime.options import RuntimeOptions

        layers = {}
        for name, spec in self.specs.items():
            module = model.get_submodule(name)
            parts = {p: module._parameters.pop(p) for p in PARTS if p in module._parameters}
            # transformers flags what it loaded; a part the shards lack was only allocated (uninitialised)
            missing = [p for p in parts if parts[p].is_meta or not getattr(parts[p], "_is_hf_initialized", False)]
            parts = {p: t.detach() for p, t in parts.items()}
            if missing:
                raise QuantConfigError(f"the checkpoint has no {name}.{missing[0]}; the folder is incomplete: "
                                       "quantize again or copy the missing shard")
            layers[name] = QuantizedLayer(spec, _shape(module, name)[1], parts=parts)
        install_quantized(model, layers, self.tied_head is not None, RuntimeOptions.from_env())
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict with each quantized layer as its stored tensors (``L.qweight``, ``L.scale``, ...)."""
        state = dict(model.state_dict())
        if self.tied_head is not None:
            state = {k: v for k, v in state.items() if not k.startswith(f"{self.tied_head}.")}
        tensors = {}
        for name, spec in self.specs.items():
            module = model.get_submodule(name)
            parts = module.to_state(name) if hasattr(module, "to_state") else module.qt.to_state(name)
            state.update({k: v.detach().cpu().contiguous().clone() for k, v in parts.items()})
            tensors[name] = {"spec": str(spec), "shape": list(_shape_of_quantized(module))}
        setattr(model.config, TRIPWIRE_KEY, TRIPWIRE)  # the saved config.json stops transformers without bitsmith too
        # the shard header of a bitsmith checkpoint (io/checkpoint.py), so bitsmith.load reads the folder too
        quantization = {"method": self.quantization_config.method, "options": {}, "tensors": tensors}
        metadata = {SHARD_MARK: QUANT_METHOD, "format_version": shard_version(tensors), "quantization": json.dumps(quantization)}
        return state, metadata

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False  # packed codes have no gradient


def _shape_of_quantized(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "out_features"):
        return module.out_features, module.in_features
    return module.num_embeddings, module.embedding_dim


def upgrade(folder: str | Path) -> Path:
    """Give a bitsmith checkpoint written before config.json carried a ``quantization_config`` that field
    (and the tripwire), from its shard headers, so that transformers loads it; returns the folder."""
    from bitsmith.io.checkpoint import CheckpointError, read_info
    from bitsmith.io.quant_config import write_into

    folder = Path(folder)
    info = read_info(folder) if folder.is_dir() else None
    if info is None:
        raise CheckpointError(f"{folder} is not a bitsmith checkpoint (no shard says format bitsmith); nothing to upgrade")
    if not write_into(folder, info.specs, info.method):
        raise CheckpointError(f"{folder} has no config.json; copy it from the model the checkpoint was quantized from")
    return folder


def old_checkpoint_message(path: object, kwargs: Mapping[str, object]) -> str | None:
    """The error for ``from_pretrained(path)`` on a bitsmith checkpoint written before config.json carried
    a ``quantization_config`` (None for anything else): transformers finds no quantizer to run, skips the
    packed tensors as unexpected and initialises every quantized layer at random, with only a warning."""
    from bitsmith.io.safetensors import read_header, shard_files

    given = kwargs.get("config")
    if kwargs.get("quantization_config") is not None or kwargs.get("gguf_file") or \
            getattr(given, "quantization_config", None) is not None:
        return None  # the caller chose how to load it
    folder = Path(str(path)) if isinstance(path, (str, Path)) else None
    if folder is None or not (folder / "config.json").is_file():
        return None  # a hub id or a folder transformers refuses by itself
    try:
        config = json.loads((folder / "config.json").read_text())
        shards = shard_files(folder)
        bitsmith = bool(shards) and is_bitsmith_shard(read_header(shards[0]).metadata)
    except Exception:  # noqa: BLE001 - anything unreadable is transformers' to report, as without bitsmith
        return None
    if not bitsmith or not isinstance(config, dict) or "quantization_config" in config:
        return None
    return (f"{folder} is a bitsmith checkpoint written before bitsmith checkpoints carried a quantization_config, so "
            "transformers cannot build its quantized layers (it would initialise them at random). Load it with "
            "bitsmith.load(path), or add the field once with `python -c \"from bitsmith.integrations.transformers "
            f"import upgrade; upgrade({str(folder)!r})\"` and call from_pretrained again")


def guard_old_checkpoints() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` once so that an old bitsmith checkpoint (no
    ``quantization_config``) is an error naming the fix instead of a randomly initialised model. transformers
    consults quantizers only for configs that name one, so no public hook sees such a folder; the wrapper
    reads one config.json and one shard header for local folders and otherwise calls straight through."""
    # the class from the executed module itself: `from transformers import PreTrainedModel` goes through
    # transformers' lazy module, which fails while one of its own imports is still running
    model_class = sys.modules["transformers.modeling_utils"].PreTrainedModel
    original = model_class.__dict__["from_pretrained"].__func__
    if getattr(original, "_bitsmith_guard", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        message = old_checkpoint_message(pretrained_model_name_or_path, kwargs)
        if message:
            raise ValueError(message)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._bitsmith_guard = True  # type: ignore[attr-defined]
    model_class.from_pretrained = classmethod(from_pretrained)


def guard_when_ready() -> None:
    """:func:`guard_old_checkpoints` once transformers' modeling module has executed (it imports the quantizer
    table half-way through, when ``PreTrainedModel`` does not exist yet); the import hook calls it again then."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or not hasattr(modeling, "PreTrainedModel"):
        return
    try:
        guard_old_checkpoints()
    except Exception as exc:  # noqa: BLE001 - the guard is a courtesy: it must never cost the registration
        log.warning("bitsmith could not guard from_pretrained against old checkpoints (%s: %s)", type(exc).__name__, exc)


def register() -> None:
    """Make ``quant_method: "bitsmith"`` known to transformers (idempotent), and old checkpoints an error."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BitsmithConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BitsmithHfQuantizer)
    guard_when_ready()


register()  # importing this module is registering it (the import hook relies on it)
