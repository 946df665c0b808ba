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


def _gguf_with(path: Path, tensors: dict) -> Path:
    """A GGUF file holding ``tensors`` {name: (float array, ggml type name)}, quantized by gguf itself."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (values, qtype) in tensors.items():
        t = gguf.GGMLQuantizationType[qtype]
        data = quantize(values, t) if t not in (gguf.GGMLQuantizationType.F32,) else values
        w.add_tensor(name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_block_bpw_counts_only_the_decoder_blocks_matrices(tmp_path: Path) -> None:
    import numpy as np

    common = load("common")
    rng = np.random.default_rng(0)
    rows = lambda r, c: rng.standard_normal((r, c)).astype(np.float32)  # noqa: E731
    path = _gguf_with(tmp_path / "m.gguf", {
        "token_embd.weight": (rows(8, 64), "F32"),  # outside the blocks: not counted
        "blk.0.attn_q.weight": (rows(4, 64), "Q8_0"),  # 34 bytes per 32 weights: 8.5 bpw
        "blk.0.attn_norm.weight": (rows(1, 64)[0], "F32"),  # a vector: not counted
        "blk.1.ffn_up.weight": (rows(2, 64), "F16"),  # 16 bpw, half as many weights
    })
    assert common.block_bpw(path) == pytest.approx((256 * 8.5 + 128 * 16) / 384)
    empty = _gguf_with(tmp_path / "e.gguf", {"token_embd.weight": (rows(8, 64), "F32")})
    with pytest.raises(ValueError, match="no decoder-block matrices"):
        common.block_bpw(empty)


def test_speed_comparisons_pair_rounds_and_use_each_runs_own_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/speed.py's issue-18 lines: w4 against each round's faster llama.cpp 4-bit type, narrower
    widths as speed ratio over byte ratio, and the bound fraction against the bandwidth of its own run."""
    monkeypatch.syspath_prepend(str(BENCH))
    speed = load("speed")

    def run(tok_s: float, mb: float, gbs: float, gguf: str = "") -> dict:
        # from an empty context every engine decodes 1.5x faster, so those ratios match the ones after the prompt
        return {"decode_tok_s": tok_s, "decode_d0_tok_s": 1.5 * tok_s, "weight_bytes": mb * 1e6, "bandwidth_gbs": gbs,
                **({"gguf_type": gguf} if gguf else {})}

    runs = {  # two rounds; round 2's host is twice as fast
        ("m", "bitsmith", "w4g128"): [run(20.0, 1000, 25.0), run(40.0, 1000, 50.0)],
        ("m", "bitsmith", "w2g64"): [run(30.0, 500, 25.0), run(72.0, 500, 50.0)],
        ("m", "llama.cpp", "Q4_0"): [run(10.0, 1000, 25.0, "Q4_0"), run(50.0, 1000, 50.0, "Q4_0")],
        ("m", "llama.cpp", "Q4_K_M"): [run(16.0, 1000, 25.0, "Q4_K_M"), run(20.0, 1000, 50.0, "Q4_K_M")],
    }
    lines = speed.decode_comparisons(runs, "m", "bitsmith")
    for where, share in (("after the prompt", "80.0%"), ("from an empty context", "120.0%")):
        at = [line for line in lines if line.startswith(f"m: decode {where}: ")]
        fastest = next(line for line in at if "fastest 4-bit" in line)
        # round 1 against Q4_K_M (16): 1.25; round 2 against Q4_0 (50): 0.80
        assert "(Q4_0/Q4_K_M)" in fastest and "1.02x" in fastest and "range 0.80-1.25" in fastest
        w2 = next(line for line in at if ": w2g64 / w4g128" in line)
        # speed 1.5x and 1.8x for half the bytes: 0.75 and 0.90 of proportional
        assert "bytes w4g128 / w2g64 = 2.00x" in w2 and "range 0.75-0.90" in w2 and "range 1.50-1.80" in w2
        bound = next(line for line in at if "of the weights' bound" in line)
        # 20 tok/s x 1 GB at 25 GB/s, 40 x 1 GB at 50 GB/s; from an empty context 1.5x that
        assert f"median {share}, best {share}" in bound
    assert len(lines) == 6
    assert not any("Q8_0" in line for line in lines)  # no w8 row: no w8 line
    assert speed.describe([1.5]) == "1.50x"
def test_report_block_bpw_leaves_the_embedding_out() -> None:
    common = load("common")
    report = {"layers": [
        {"name": "model.embed_tokens", "shape": [100, 8], "bits_per_weight": 8.05},  # not a block matrix
        {"name": "model.layers.0.mlp.up_proj", "shape": [4, 64], "bits_per_weight": 2.25},
        {"name": "model.layers.0.self_attn.v_proj", "shape": [2, 64], "bits_per_weight": 4.25},
    ]}
    blocks = {"model.layers.0.mlp.up_proj": (4, 64), "model.layers.0.self_attn.v_proj": (2, 64)}
    assert common.report_block_bpw(report, blocks) == pytest.approx((256 * 2.25 + 128 * 4.25) / 384)
    with pytest.raises(ValueError, match="no decoder-block matrices"):
        common.report_block_bpw({"layers": report["layers"][:1]}, blocks)


def test_layer_errors_compare_by_kind_over_the_blocks_both_have() -> None:
    layer_errors = load("layer_errors")

    def report(errors: dict[str, float]) -> dict:
        layers = [{"name": "model.embed_tokens", "output_error": 9.0}]  # not a block matrix: ignored
        layers += [{"name": name, "output_error": e} for name, e in errors.items()]
        layers.append({"name": "model.layers.0.mlp.gate_proj"})  # no output_error (uncalibrated): skipped
        return {"report": {"layers": layers}}

    q, down = "model.layers.{}.self_attn.q_proj", "model.layers.{}.mlp.down_proj"
    a = layer_errors.block_errors(report({q.format(0): 1e-3, q.format(1): 4e-3, q.format(2): 5.0, down.format(0): 2e-2}))
    b = layer_errors.block_errors(report({q.format(0): 2e-3, q.format(1): 2e-3, down.format(0): 1e-2}))
    assert a["q_proj"] == {0: 1e-3, 1: 4e-3, 2: 5.0} and "gate_proj" not in a
    rows = layer_errors.compare({"a": a, "b": b})
    # q_proj over blocks 0-1 only (b lacks 2): geomeans 2e-3 both, ratio 1; b lower in block 1 only
    assert "| q_proj | 2 | 2.000e-03 | 2.000e-03 | 1.000 | 1/2 |" in rows
    assert "| down_proj | 1 | 2.000e-02 | 1.000e-02 | 0.500 | 1/1 |" in rows


def test_speed_counts_the_bytes_a_3bit_decode_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench/speed.py's MB/token of a w3 model whose codes are held in the mixed layout: every layer's packed
    codes, scales and zeros once (session 17's run counted 603 of 766 MB: to_state's temporary copies of the
    codes were compared by address, and a freed copy's address came back)."""
    monkeypatch.syspath_prepend(str(BENCH))
    speed = load("speed")
    import torch

    import bitsmith
    from bitsmith.nn.qlinear import QuantLinear
    from tests.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    folder = bitsmith.quantize(src, tmp_path / "q", "w3g64", "rtn")
    model = bitsmith.load(folder).model
    kernels = [m._kernel for m in model.modules() if isinstance(m, QuantLinear)]
    want = sum(k.qweight.nbytes + k.scale.nbytes + (0 if k.zero is None else k.zero.nbytes) for k in kernels)
    want += sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert speed._weight_bytes_per_token(model) == want


def test_speed_takes_a_checkpoint_made_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bench/speed.py --checkpoint MODEL:NAME=PATH: a malformed value, a model the run does not measure or a
    folder that is not a checkpoint stops the run with a message before anything is made."""
    monkeypatch.syspath_prepend(str(BENCH))  # speed.py imports its siblings (tools, common, iquant_anchor)
    speed = load("speed")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "bitsmith.json").write_text("{}")
    got = speed.extra_checkpoints([f"qwen2.5-coder-1.5b:w3g256vq={ckpt}"], ["smollm2-135m", "qwen2.5-coder-1.5b"])
    assert got == {("qwen2.5-coder-1.5b", "w3g256vq"): ckpt}
    for value, says in [("qwen2.5-coder-1.5b", "MODEL:NAME=PATH"), (f"other:w3={ckpt}", "not in --models"),
                        (f"qwen2.5-coder-1.5b:w3={tmp_path}", "not a bitsmith checkpoint")]:
        with pytest.raises(SystemExit, match=says):
            speed.extra_checkpoints([value], ["qwen2.5-coder-1.5b"])
