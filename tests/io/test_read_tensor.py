"""read_tensor (plain reads, no memory map) against the safetensors library on fresh random tensors of
every dtype it reads, including empty and scalar shapes, and what a streamed read leaves resident."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bitsmith.io.safetensors import SafetensorsError, can_read_tensor, read_header, read_tensor

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _random(dtype, shape, g):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


@pytest.mark.parametrize("seed", range(3))
def test_read_tensor_equals_the_safetensors_library(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]
    tensors = {f"t{i}": _random(dtype, shapes[(i + seed) % len(shapes)], g) for i, dtype in enumerate(DTYPES)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        for name, entry in header.tensors.items():
            assert can_read_tensor(entry)
            got, want = read_tensor(entry), f.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name


def test_a_file_cut_inside_a_tensor_is_named(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    entry = read_header(path).tensors["w"]
    path.write_bytes(path.read_bytes()[:-100])  # cut after the header was read
    with pytest.raises(SafetensorsError, match="ended inside tensor w"):
        read_tensor(entry)


def test_streaming_a_folder_leaves_no_file_mapped(tmp_path):
    """The HF source reads through read_tensor: after loading every tensor, no shard is mapped."""
    from bitsmith.models import open_source
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m")
    source = open_source(model)
    for name in source.tensor_names():
        source.load_tensor(name)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system")
    assert str(model) not in maps.read_text()
