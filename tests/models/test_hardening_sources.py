"""Model folders are data, never code, and never a door to other files: a folder that needs its own
Python code (``auto_map``) is refused without running it, and every file a folder's index names
stays inside that folder."""

import builtins
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.tiny import make_tiny_model

from bitsmith.io.safetensors import INDEX_FILE, SafetensorsError, confined_path, read_header, shard_files
from bitsmith.models.errors import ModelSourceError
from bitsmith.models.open import open_source


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hardening") / "tiny")


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitsmith.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def _remote_code_folder(tiny: Path, folder: Path, marker: Path) -> Path:
    """A copy of ``tiny`` whose config names an unknown model_type and its own Python file, which
    would write ``marker`` when imported."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilnet", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n"
    )
    return folder


@pytest.mark.parametrize("command", [["eval", "--max-windows", "1"], ["generate", "the", "--max-new-tokens", "1"]])
def test_auto_map_folder_is_refused_and_its_code_never_runs(tiny: Path, tmp_path: Path, command: list) -> None:
    marker = tmp_path / "MARKER"
    folder = _remote_code_folder(tiny, tmp_path / "remote", marker)
    name, *rest = command
    result = _run(name, str(folder), *rest, stdin="y\ny\n")  # "yes" to transformers' remote-code prompt
    assert not marker.exists()
    assert result.returncode == 1
    assert "needs its own Python code (auto_map" in result.stderr
    assert "never runs code from a model folder" in result.stderr
    assert "Traceback" not in result.stderr and "Do you wish to run" not in result.stdout + result.stderr


def test_tokenizer_that_needs_its_own_code_is_refused(tiny: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    folder = tmp_path / "remote_tokenizer"
    shutil.copytree(tiny, folder)
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text("{}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    result = _run("generate", str(folder), "the cat", "--max-new-tokens", "1", stdin="y\ny\n")
    assert not marker.exists()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "this tokenizer needs its own Python code (auto_map" in result.stderr
    assert "trust_remote_code" not in result.stderr


def test_known_model_type_with_auto_map_uses_transformers_own_class(tiny: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    folder = _remote_code_folder(tiny, tmp_path / "known", marker)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    source = open_source(folder)
    source.tokenizer()
    assert source.config.model_type == "llama"
    assert not marker.exists()


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path opened through open() / Path.open while the test runs."""
    seen: list[str] = []
    real = io.open

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return seen


def _indexed_folder(tiny: Path, folder: Path, shard_name: str) -> Path:
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, folder / name)
    weight_map = {n: shard_name for n in read_header(tiny / "model.safetensors").tensors}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("entry", ["/etc/passwd", "../other/model.safetensors", "ABSOLUTE",
                                   "sub/../../other/model.safetensors", "..\\other\\model.safetensors"])
def test_index_entries_outside_the_folder_are_refused_unopened(tiny: Path, tmp_path: Path, entry: str,
                                                             opened: list[str]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tiny / "model.safetensors", other / "model.safetensors")
    entry = str(other / "model.safetensors") if entry == "ABSOLUTE" else entry
    folder = _indexed_folder(tiny, tmp_path / "model", entry)
    opened.clear()
    with pytest.raises(SafetensorsError, match="outside the model folder"):
        shard_files(folder)
    with pytest.raises(ModelSourceError, match="outside the model folder"):
        open_source(folder)
    assert not [p for p in opened if "other" in p or p == "/etc/passwd"]


@pytest.mark.parametrize("entry", ["/etc/passwd", "../other/model.safetensors"])
def test_inspect_refuses_an_index_pointing_elsewhere(tiny: Path, tmp_path: Path, entry: str) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tiny / "model.safetensors", other / "model.safetensors")
    folder = _indexed_folder(tiny, tmp_path / "model", entry)
    result = _run("inspect", str(folder))
    assert result.returncode == 1 and "outside the model folder" in result.stderr
    assert "Traceback" not in result.stderr and "bits/weight" not in result.stdout


def test_symlinked_shards_the_folder_holds_are_read(tiny: Path, tmp_path: Path) -> None:
    """The Hugging Face cache layout: snapshots/<rev>/*.safetensors are links into blobs/."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copyfile(tiny / "model.safetensors", blobs / "abc123")
    folder = _indexed_folder(tiny, tmp_path / "snapshot", "model-00001-of-00001.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to(blobs / "abc123")
    assert shard_files(folder) == [folder / "model-00001-of-00001.safetensors"]
    assert "model.norm.weight" in open_source(folder).tensor_names()


def test_a_symlinked_directory_inside_the_folder_does_not_lead_out(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "escape").symlink_to(tmp_path.parent)
    with pytest.raises(SafetensorsError, match="outside the model folder"):
        confined_path(folder, "escape/x.safetensors", INDEX_FILE)
    assert confined_path(folder, "sub/x.safetensors", INDEX_FILE) == folder / "sub" / "x.safetensors"


def test_tokenizer_files_outside_the_folder_are_refused(tiny: Path, tmp_path: Path) -> None:
    """transformers follows tokenizer_config.json's fast_tokenizer_files wherever they point."""
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tiny / "tokenizer.json", other / "tokenizer.1.0.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["fast_tokenizer_files"] = ["../other/tokenizer.1.0.json"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="fast_tokenizer_files.*outside the model folder"):
        open_source(folder).tokenizer()
    config["fast_tokenizer_files"] = ["tokenizer.1.0.json"]  # inside: fine
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copyfile(tiny / "tokenizer.json", folder / "tokenizer.1.0.json")
    assert open_source(folder).tokenizer()("the cat").input_ids
