"""pipeline.stages.block_stages: the stages are found once per kind of block and reused, with the same result."""

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer

from bitsmith.calib import calibration_batches
from bitsmith.pipeline import layerwise, stages
from bitsmith.pipeline.layerwise import quantize_blocks
from bitsmith.pipeline.plan import QuantizePlan
from bitsmith.spec import QuantSpec


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3: sliding and full attention blocks
def test_stages_found_once_per_run_change_nothing(tmp_path, monkeypatch, arch):
    model = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=3)
    calib = calibration_batches(tiny_tokenizer(), sample_text(1500), samples=5, seq_len=40)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2)
    found = []
    real = stages.find_stages
    monkeypatch.setattr(stages, "find_stages", lambda *a: found.append(1) or real(*a))
    reused = _tensors(quantize_blocks(model, tmp_path / "reused", plan, calib))
    assert len(found) == 1  # block 0 only: the later blocks are of the same class with the same linears

    real_process = layerwise._process_block
    monkeypatch.setattr(layerwise, "_process_block", lambda *a: real_process(*a[:7]))  # no shared findings
    found.clear()
    each = _tensors(quantize_blocks(model, tmp_path / "each", plan, calib))
    assert len(found) == 3  # every block ran its own discovery forward, as before
    assert set(reused) == set(each)
    for name in reused:
        assert torch.equal(reused[name], each[name]), name


def test_block_stages_keys_on_the_block_class_and_its_linears():
    class A(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            self.lins = torch.nn.ModuleDict({n: torch.nn.Linear(4, 4) for n in names})

        def forward(self, x):
            return sum(lin(x) for lin in self.lins.values())

    class B(A):
        def forward(self, x):
            y = x
            for lin in self.lins.values():
                y = lin(y)
            return y

    x, known = torch.randn(2, 4), {}
    a, b = A(["p", "q"]), B(["p", "q"])
    assert stages.block_stages(a, dict(a.lins), x, ((), {}), known) == [["p", "q"]]  # one shared input
    assert stages.block_stages(b, dict(b.lins), x, ((), {}), known) == [["p"], ["q"]]  # another class: found anew
    c = A(["p"])
    assert stages.block_stages(c, dict(c.lins), x, ((), {}), known) == [["p"]]  # other linears: found anew
    assert len(known) == 3
    got = stages.block_stages(a, dict(a.lins), x, ((), {}), known)
    got[0].append("changed")  # a copy: the caller cannot alter what later blocks get
    assert stages.block_stages(a, dict(a.lins), x, ((), {}), known) == [["p", "q"]]
