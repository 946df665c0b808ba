"""QuantEmbedding: an embedding table kept quantized; a lookup dequantizes only the rows it needs.

Codes narrower than a byte are held packed (formats.packing's layout) and unpacked per looked-up row:
one byte per code would make a 6-bit table a third larger than its packed bytes. A tied output head
(a native-kernel QuantLinear over the same table) lends its packed codes, so the table is held once
(:func:`shared_codes`); 8-bit codes are shared as they are (NativeKernel keeps an 8-bit table's tensor).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bitsmith.formats.packing import pack, packed_row_bytes, unpack
from bitsmith.tensor import QuantizedTensor


def packable_spec(spec) -> bool:
    """Affine codes below 8 bits: the tables packing shrinks and unpack restores."""
    return spec.bits < 8 and spec.grid == "uniform"


def _packable(qt: QuantizedTensor) -> bool:
    return packable_spec(qt.spec) and qt.grid is None and qt.rotation is None  # in the layer's own basis


def shared_codes(head: nn.Module | None, qt: QuantizedTensor) -> torch.Tensor | None:
    """The packed codes of a tied head's native kernel when they are ``qt``'s codes in the natural layout
    (3-bit kernels may repack theirs in place for the int8 decode, so never those), else None."""
    if not _packable(qt):
        return None
    return _kernel_codes(head, qt.spec.bits, qt.shape, qt.codes.device)


def _kernel_codes(head: nn.Module | None, bits: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    from bitsmith.kernels.cpu import NativeKernel

    kernel = getattr(head, "_kernel", None)
    if not isinstance(kernel, NativeKernel) or bits == 3 or kernel.mixed3:
        return None
    codes = kernel.qweight
    if tuple(codes.shape) != (shape[0], packed_row_bytes(shape[1], bits)) or codes.device != device:
        return None
    return codes


def packed_embedding(parts: Mapping[str, torch.Tensor], spec, in_features: int, head: nn.Module | None,
                     embed_scale: torch.Tensor | float | None = None) -> "QuantEmbedding":
    """A QuantEmbedding over a checkpoint's packed parts (``qweight``, ``scale``, ``zero``) of a
    :func:`packable_spec`, in a tied ``head``'s kernel bytes where it has them, else in the parts' own."""
    qweight = parts["qweight"]
    codes = _kernel_codes(head, spec.bits, (qweight.shape[0], in_features), qweight.device)
    return QuantEmbedding.from_packed(qweight if codes is None else codes, parts["scale"], parts.get("zero"), spec,
                                      in_features, embed_scale)


class QuantEmbedding(nn.Module):
    def __init__(self, qt: QuantizedTensor, embed_scale: torch.Tensor | float | None = None,
                 packed: torch.Tensor | None = None) -> None:
        """``packed``: ``qt``'s codes in formats.packing's layout to hold instead of ``qt.codes`` (a tied
        head's, :func:`shared_codes`); without it, codes below 8 bits are packed here."""
        super().__init__()
        self._hold(qt.shape, qt.spec, embed_scale)
        if _packable(qt):
            self._packed = pack(qt.codes, qt.spec.bits) if packed is None else packed
            self._scale, self._zero = qt.scale, qt.zero
        else:
            self._table = qt

    def _hold(self, shape: tuple[int, int], spec, embed_scale: torch.Tensor | float | None) -> None:
        """The table's description, held neither packed nor unpacked yet (the caller sets one)."""
        self.num_embeddings, self.embedding_dim = shape
        self.spec = spec
        # Some architectures (Gemma) scale the looked-up rows; keep the source module's factor.
        self.embed_scale = embed_scale
        self._table: QuantizedTensor | None = None  # the unpacked table, or None when held packed
        self._packed = self._scale = self._zero = None

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec, in_features: int,
                    embed_scale: torch.Tensor | float | None = None) -> "QuantEmbedding":
        """From a checkpoint's packed codes (formats.packing's layout) of affine codes below 8 bits, held
        as they are: no unpacked table is ever made."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._hold((packed.shape[0], in_features), spec, embed_scale)
        module._packed, module._scale, module._zero = packed, scale, zero
        return module

    @property
    def qt(self) -> QuantizedTensor:
        """The whole table as a QuantizedTensor (unpacked on demand when held packed)."""
        if self._table is not None:
            return self._table
        return QuantizedTensor(unpack(self._packed, self.spec.bits, self.embedding_dim), self._scale, self._zero, self.spec)

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors this table keeps alive (packed codes or unpacked ones, scales, zeros)."""
        if self._table is not None:
            return [t for t in (self._table.codes, self._table.scale, self._table.zero, self._table.grid) if t is not None]
        return [t for t in (self._packed, self._scale, self._zero) if t is not None]

    def _rows(self, ids: torch.Tensor) -> QuantizedTensor:
        if self._table is not None:
            return self._table.rows(ids)
        codes = unpack(self._packed[ids], self.spec.bits, self.embedding_dim)
        return QuantizedTensor(codes, self._scale[ids], None if self._zero is None else self._zero[ids], self.spec)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Moving the module moves the quantized table (it is not a parameter); dtypes are kept."""
        super()._apply(fn, recurse)
        held = self._table.codes if self._table is not None else self._packed
        target = fn(torch.empty(0, device=held.device)).device  # .half() keeps the device
        if held.device != target:
            if self._table is not None:
                self._table = self._table.to(target)
            else:
                self._packed, self._scale = self._packed.to(target), self._scale.to(target)
                self._zero = None if self._zero is None else self._zero.to(target)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids.reshape(-1)).dequantize()  # [n, dim]
        out = rows.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, spec={self.spec}"
