"""The ``quantization_config`` a bitsmith checkpoint's ``config.json`` carries, for transformers.

Hugging Face tools decide how to build a quantized model from ``config.json``'s
``quantization_config`` (``quant_method`` names the quantizer). A bitsmith checkpoint says::

    "quantization_config": {
        "quant_method": "bitsmith", "format_version": "1", "method": "gptq",
        "spec": "w4g128",                                  the spec most layers use
        "modules": ["model.layers.*.self_attn.q_proj", ...],  quantized modules; * = every block index
        "overrides": {"model.layers.3.mlp.down_proj": "w8"},  layers whose spec differs
        "load_with": "import bitsmith ..."                  for a reader who meets the field unprepared
    }

Without ``import bitsmith`` transformers would not know ``quant_method: "bitsmith"``: it warns, skips
the quantization and initialises every quantized layer at random (a model that scores a perplexity of
~1e17 with no error). So the writer also sets ``transformers_weights`` (the config key transformers
reads for a weights file of another name) to a text that is no file name: transformers then raises
``ValueError: The transformers file in the config seems to be incorrect ...: <that text>``, which
says to ``import bitsmith`` or use ``bitsmith.load``. bitsmith's quantizer clears it before transformers
looks (:mod:`bitsmith.integrations.transformers`). A tool that copies this config.json into another
format's folder must drop both fields (:func:`strip`).

A ``*`` pattern is written only when the layer is quantized in every block (``0 .. num_hidden_layers
- 1``), so expanding it against the model's own module names gives back exactly the written set;
anything else is listed by name. The shard headers stay the checkpoint's ground truth (per-tensor
spec and shape); this is the declaration transformers reads before it opens a shard.

Pure functions of names and specs: torch-free, used by the checkpoint writer and by
:mod:`bitsmith.integrations.transformers`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from bitsmith.spec import QuantSpec, SpecError

QUANT_METHOD = "bitsmith"
CONFIG_VERSION = "1"
LOAD_HINT = ("a bitsmith checkpoint: run `import bitsmith` before transformers' from_pretrained "
             "(bitsmith registers this quant_method), or load it with bitsmith.load(path)")
TRIPWIRE_KEY = "transformers_weights"
TRIPWIRE = ("not a weights file - this is a bitsmith checkpoint: run `import bitsmith` before "
            "from_pretrained (it registers quant_method 'bitsmith'), or load it with bitsmith.load(path)")
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class QuantConfigError(ValueError):
    """A ``quantization_config`` that cannot describe (or be read back into) a model's layers."""


def _pattern(name: str) -> tuple[str, int | None]:
    """(name with its first block index replaced by ``*``, that index), or (name, None) without one."""
    m = _BLOCK_INDEX.search(name)
    if m is None:
        return name, None
    return f"{name[:m.start()]}.*.{name[m.end():]}", int(m.group(1))


def num_blocks(config: Mapping) -> int | None:
    """The decoder block count of an HF ``config.json`` dict (a multimodal config keeps it in text_config)."""
    for d in (config, config.get("text_config") or {}):
        n = d.get("num_hidden_layers") if isinstance(d, Mapping) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def build(specs: Mapping[str, QuantSpec | str], method: str, blocks: int | None) -> dict:
    """The ``quantization_config`` dict for a checkpoint whose quantized layers are ``specs``
    (module name -> spec) in a model of ``blocks`` decoder blocks (None: list every name)."""
    specs = {name: str(spec) for name, spec in specs.items()}
    default = Counter(specs.values()).most_common(1)[0][0] if specs else ""
    indices: dict[str, set[int]] = {}
    for name in specs:
        pattern, index = _pattern(name)
        if index is not None:
            indices.setdefault(pattern, set()).add(index)
    full = set(range(blocks)) if blocks else None
    whole = {p for p, seen in indices.items() if seen == full}
    modules = sorted(whole | {n for n in specs if _pattern(n)[0] not in whole})
    overrides = {n: s for n, s in sorted(specs.items()) if s != default}
    return {"quant_method": QUANT_METHOD, "format_version": CONFIG_VERSION, "method": method, "spec": default,
            "modules": modules, "overrides": overrides, "load_with": LOAD_HINT}


def expand(qconfig: Mapping, module_names: Iterable[str]) -> dict[str, QuantSpec]:
    """Module name -> spec for each of ``module_names`` (the model's own) the config quantizes.
    Raises QuantConfigError when the config is malformed or names a module the model lacks."""
    modules, overrides, default = qconfig.get("modules"), qconfig.get("overrides", {}), qconfig.get("spec")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules) \
            or not isinstance(overrides, Mapping) or not isinstance(default, str):
        raise QuantConfigError("the bitsmith quantization_config lacks its modules, overrides or spec; "
                               "the checkpoint's config.json is damaged: quantize again or restore config.json")
    names = list(module_names)
    found: dict[str, str] = {}
    for entry in modules:
        if "*" in entry:
            rx = re.compile(re.escape(entry).replace(r"\*", r"\d+") + r"\Z")
            hits = [n for n in names if rx.match(n)]
        else:
            hits = [entry] if entry in names else []
        if not hits:
            raise QuantConfigError(f"the bitsmith quantization_config names {entry[:120]!r}, which this model "
                                   "does not have; config.json does not match the model's architecture")
        found.update({n: str(overrides.get(n, default)) for n in hits})
    try:
        return {n: QuantSpec.parse(s) for n, s in found.items()}
    except SpecError as exc:
        raise QuantConfigError(f"the bitsmith quantization_config holds a bad spec: {exc}") from exc


def write_into(folder: Path, specs: Mapping[str, QuantSpec | str], method: str) -> bool:
    """Add (or replace) the ``quantization_config`` of ``folder/config.json``; False without the file.
    Written to a temporary file and renamed, so a crash leaves the old config.json whole."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    config["quantization_config"] = build(specs, method, num_blocks(config))
    config[TRIPWIRE_KEY] = TRIPWIRE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return True


def strip(config: dict) -> dict:
    """``config`` (a config.json dict) without bitsmith's quantization_config and transformers tripwire,
    for a folder of another format made from a bitsmith checkpoint."""
    out = dict(config)
    if isinstance(out.get("quantization_config"), Mapping) and out["quantization_config"].get("quant_method") == QUANT_METHOD:
        del out["quantization_config"]
    if out.get(TRIPWIRE_KEY) == TRIPWIRE:
        del out[TRIPWIRE_KEY]
    return out


SHARD_MARK = "bitsmith_format"  # save_pretrained forces a shard's "format" to "pt": bitsmith's mark goes here


def is_bitsmith_shard(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors shard's ``__metadata__`` says bitsmith: written by bitsmith
    (``format: bitsmith``) or by transformers' save_pretrained of a bitsmith-loaded model."""
    return metadata.get("format") == QUANT_METHOD or metadata.get(SHARD_MARK) == QUANT_METHOD
