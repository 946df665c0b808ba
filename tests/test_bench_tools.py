"""bench/tools.py and bench/common.py: where benchmarks find external tools and shipped texts.

The benchmarks themselves are not tests; these check only the lookups they all rely on, so that a
fresh clone either finds its tools or says how to install them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    for var in ("LLAMA_BIN", "BITSMITH_LLAMA_CPP", "BITSMITH_PEER_HQQ"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BITSMITH_TOOLS", str(tmp_path))
    return load("tools")


def test_tools_live_under_the_tools_folder(tools: ModuleType, tmp_path: Path) -> None:
    assert tools.tools_root() == tmp_path
    assert tools.llama_bin_dir() == tmp_path / "llama.cpp" / "build" / "bin"
    assert tools.peer_dir("hqq") == tmp_path / "peers" / "hqq"


def test_a_missing_tool_names_the_make_target(tools: ModuleType) -> None:
    with pytest.raises(tools.ToolMissing, match="make bench-tools"):
        tools.llama_bin("llama-quantize")
    with pytest.raises(tools.ToolMissing, match="BITSMITH_PEER_HQQ"):
        tools.peer_python("hqq")


def test_per_tool_overrides_win(tools: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "bin").mkdir(parents=True)
    (elsewhere / "bin" / "python").write_text("")
    (elsewhere / "llama-quantize").write_text("")
    monkeypatch.setenv("LLAMA_BIN", str(elsewhere))
    monkeypatch.setenv("BITSMITH_PEER_HQQ", str(elsewhere))
    assert tools.llama_bin("llama-quantize") == elsewhere / "llama-quantize"
    assert tools.peer_python("hqq") == elsewhere / "bin" / "python"


def test_command_line_exits_1_with_the_fix(tools: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert tools.main(["llama-bin"]) == 1
    assert "make bench-tools" in capsys.readouterr().err
    assert tools.main(["nonsense"]) == 2


def test_shipped_texts_are_found_and_unknown_ones_listed() -> None:
    common = load("common")
    prose = common.text_path()
    assert prose.is_file() and len(prose.read_text(encoding="utf-8")) == 60_000
    assert common.text_path(common.CALIBRATION).is_file()
    with pytest.raises(FileNotFoundError, match="pride_and_prejudice_60k.txt"):
        common.text_path("missing.txt")
