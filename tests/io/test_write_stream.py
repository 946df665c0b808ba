"""write_safetensors_stream: tensors written piece by piece read back, through the safetensors
library, as the whole tensors; pieces that do not add up to a tensor's shape are refused."""

import pytest
import torch

from bitsmith.io.checkpoint import CheckpointError, write_safetensors_stream


def test_pieces_read_back_as_whole_tensors(tmp_path) -> None:
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    whole = {"a": torch.randn(7, 13, generator=gen).to(torch.bfloat16), "norm": torch.ones(5),
             "codes": torch.randint(0, 255, (3, 4, 5), dtype=torch.uint8, generator=gen), "empty": torch.zeros(0, 4)}
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in whole.items()}
    pieces = lambda name: whole[name].reshape(-1).split(6)  # noqa: E731  uneven pieces of 6 values
    write_safetensors_stream(tmp_path / "m.safetensors", layout, pieces, {"format": "pt"})
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back.keys() == whole.keys()
    assert all(torch.equal(back[n], whole[n]) for n in whole)


def test_short_or_mistyped_pieces_are_refused(tmp_path) -> None:
    layout = {"a": (torch.float32, (4, 4))}
    with pytest.raises(CheckpointError, match="got 60 bytes, its shape needs 64"):
        write_safetensors_stream(tmp_path / "m.safetensors", layout, lambda n: [torch.zeros(15)])
    with pytest.raises(CheckpointError, match="float16"):
        write_safetensors_stream(tmp_path / "m.safetensors", layout, lambda n: [torch.zeros(16, dtype=torch.float16)])
    assert not (tmp_path / "m.safetensors").exists()  # nothing half-written left behind
