"""Model sources: one interface over a Hugging Face folder, a GGUF file, or a named alias.

This module holds the interface and the Hugging Face folder source; GGUF files are in
:mod:`bitsmith.models.gguf_source`, aliases in :mod:`bitsmith.models.aliases`, and
:func:`bitsmith.models.open.open_source` picks one for a model argument.

A :class:`ModelSource` hands out tensors one at a time, by their Hugging Face name, as float32 in
Hugging Face layout (``[out, in]`` for linears), read lazily from memory-mapped files, so a model
larger than RAM can be walked block by block. Every file is checked against its own header before
use, and every problem is reported in the user's terms with the fix.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bitsmith.io.quant_config import is_bitsmith_shard
from bitsmith.io.safetensors import (
    INDEX_FILE, SafetensorsError, StTensor, can_read_tensor, confined_path, read_header, read_tensor, shard_files,
)
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.hf import causal_lm_class, refuse_remote_code, set_offline

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
EXTRA_HF_FILES = ("generation_config.json",)


class TensorStore(Protocol):
    """What a source needs from its container: names, shapes, dtypes and one tensor at a time."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def load(self, name: str) -> torch.Tensor: ...


@dataclass
class ModelSource:
    """A model on disk: its config, its tokenizer and its tensors (by Hugging Face name)."""

    path: Path  # the folder or .gguf file actually used
    config: PretrainedConfig
    kind: str  # "hf" | "gguf" | "bitsmith"
    store: TensorStore = field(repr=False)
    tokenizer_dir: Path | None = None  # folder holding the tokenizer files; None: ``path``
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    def tensor_names(self) -> list[str]:
        """Hugging Face names of all tensors, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
        return self.store.names()

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in Hugging Face (torch) layout, without reading the data."""
        return self.store.shape(name)

    def source_dtype(self, name: str) -> str:
        """Storage type on disk: ``bf16``/``f16``/``f32`` for safetensors, the ggml name for GGUF."""
        return self.store.dtype(name)

    def load_tensor(self, name: str, keep_half: bool = False) -> torch.Tensor:
        """One tensor, float32 (integer tensors keep their type), checked to be finite. ``keep_half``: a
        bf16/fp16 tensor stays in its dtype (every value as float32 would hold it, half the bytes), for a
        caller that makes it float32 a slice at a time."""
        import torch

        from bitsmith.primitives import abs_max

        tensor = self.store.load(name)
        if tensor.is_floating_point():
            if not (keep_half and tensor.dtype in (torch.bfloat16, torch.float16)):
                tensor = tensor.to(torch.float32)
            # max |x| is NaN or inf exactly when some element is (abs_max: no tensor-sized copy)
            if tensor.numel() and not math.isfinite(abs_max(tensor)):
                raise ModelSourceError(
                    f"tensor {name} in {self.path.name} contains NaN or inf values; "
                    "the file is corrupt, download it again"
                )
        return tensor

    def tokenizer(self) -> Any:
        """A transformers tokenizer, loaded offline (from the folder or the GGUF metadata)."""
        if self._tokenizer is None:
            set_offline()
            from transformers import AutoTokenizer

            folder = self.tokenizer_dir or self.path
            check_tokenizer_files(folder)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError, KeyError) as err:
                auto_map = _read_config_json(folder / "tokenizer_config.json").get("auto_map")
                if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:  # transformers refused its code
                    raise ModelSourceError(
                        f"{folder}: this tokenizer needs its own Python code (auto_map in tokenizer_config.json); "
                        "bitsmith never runs code from a model folder; use a model whose tokenizer transformers "
                        "supports"
                    ) from err
                raise ModelSourceError(
                    f"cannot load the tokenizer of {self.path} ({err}); copy the tokenizer files "
                    "(tokenizer.json, tokenizer_config.json) from the original model"
                ) from err
        return self._tokenizer

    def save_config_and_tokenizer(self, out_dir: Path) -> None:
        """Write config.json, generation_config.json and the tokenizer files (with chat template)
        into ``out_dir``, so that it is a self-contained Hugging Face folder once weights are added."""
        from transformers import GenerationConfig

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        if not getattr(config, "architectures", None):
            config.architectures = [causal_lm_class(config).__name__]
        config.save_pretrained(str(out_dir))
        self.tokenizer().save_pretrained(str(out_dir))
        copied = False
        if self.kind != "gguf":
            for name in EXTRA_HF_FILES:
                src = self.path / name
                if src.is_file() and src.resolve() != (out_dir / name).resolve():
                    shutil.copyfile(src, out_dir / name)
                    copied = True
        if not copied and not (out_dir / "generation_config.json").is_file():
            GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))


# --------------------------------------------------------------------------- Hugging Face folders


def open_hf_folder(folder: Path) -> ModelSource:
    """Open a folder with config.json, tokenizer files and safetensors shards."""
    folder = Path(folder)
    config = load_hf_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"no tokenizer in {folder} (expected one of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files from the original model repo into the folder"
        )
    store = SafetensorsStore(folder)
    kind = "bitsmith" if is_bitsmith_shard(store.metadata) else "hf"
    return ModelSource(path=folder, config=config, kind=kind, store=store)


def load_hf_config(folder: Path) -> PretrainedConfig:
    """config.json of a folder, checked to be a causal LM that transformers can build."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"{folder} has no config.json; download the full model repo "
            "(config.json, tokenizer files and *.safetensors) into one folder"
        )
    set_offline()
    from transformers import AutoConfig

    refuse_remote_code(_read_config_json(folder / "config.json"), folder / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError) as err:
        model_type = _read_model_type(folder / "config.json")
        raise ModelSourceError(
            f"unsupported architecture {model_type!r} in {folder / 'config.json'}: this "
            "transformers version does not know it; upgrade transformers or use a supported model"
        ) from err
    except OSError as err:
        raise ModelSourceError(f"cannot read {folder / 'config.json'} ({err}); download it again") from err
    causal_lm_class(config)  # fail now, not after reading gigabytes
    return config


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a tokenizer_config.json whose ``fast_tokenizer_files`` (the one list of file names in
    it that transformers follows) names a file outside ``folder``; see
    :func:`bitsmith.io.safetensors.confined_path` for the rule."""
    config = _read_config_json(folder / "tokenizer_config.json")
    names = config.get("fast_tokenizer_files") or []
    for name in names if isinstance(names, list) else [names]:
        try:
            confined_path(folder, name, "tokenizer_config.json (fast_tokenizer_files)")
        except SafetensorsError as err:
            raise ModelSourceError(str(err)) from err


def _read_config_json(config_path: Path) -> dict[str, Any]:
    """The raw JSON object of a config.json; {} when unreadable (AutoConfig then reports why)."""
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _read_model_type(config_path: Path) -> str:
    try:
        return str(json.loads(config_path.read_text()).get("model_type", "?"))
    except (OSError, ValueError):
        return "?"




class SafetensorsStore:
    """Tensors of one or many safetensors shards, read lazily through ``safe_open``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        shards = self._shard_files(folder)
        self._where: dict[str, Path] = {}
        self._info: dict[str, StTensor] = {}
        self.metadata: dict[str, str] = {}
        for shard in shards:
            try:
                header = read_header(shard)
            except SafetensorsError as err:
                raise ModelSourceError(str(err)) from err
            self.metadata.update(header.metadata)
            for name, info in header.tensors.items():
                if name in self._where:
                    raise ModelSourceError(
                        f"tensor {name} appears in both {self._where[name].name} and {shard.name}; "
                        f"remove the stray shard from {folder}"
                    )
                self._where[name] = shard
                self._info[name] = info
        self._check_index(folder)
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _shard_files(folder: Path) -> list[Path]:
        try:
            shards = shard_files(folder)
        except SafetensorsError as err:
            raise ModelSourceError(str(err)) from err
        if not shards:
            raise ModelSourceError(
                f"no *.safetensors weights in {folder}; download the safetensors files "
                "(pytorch_model.bin checkpoints are not supported: convert them to safetensors first)"
            )
        return shards

    def _check_index(self, folder: Path) -> None:
        index = folder / INDEX_FILE
        if not index.is_file():
            return
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            where = self._where.get(name)
            if where is None or where.name != shard:
                raise ModelSourceError(
                    f"{INDEX_FILE} says {name} is in {shard} but it is not there; "
                    "the download is inconsistent, download the model again"
                )

    def names(self) -> list[str]:
        return list(self._where)

    def _get_info(self, name: str) -> StTensor:
        try:
            return self._info[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.folder}; see tensor_names()") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get_info(name).shape

    def dtype(self, name: str) -> str:
        return self._get_info(name).dtype.lower()

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self._get_info(name)
        if can_read_tensor(info):  # plain reads: a streamed model never stays mapped (read_tensor)
            try:
                return read_tensor(info)
            except SafetensorsError as err:
                raise ModelSourceError(str(err)) from err
        shard = self._where[name]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(shard), framework="pt")
            self._handles[shard] = handle
        return handle.get_tensor(name)
