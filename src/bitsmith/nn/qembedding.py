"""QuantEmbedding: an embedding table kept quantized; a lookup dequantizes only the rows it needs."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.tensor import QuantizedTensor


class QuantEmbedding(nn.Module):
    def __init__(self, qt: QuantizedTensor, embed_scale: torch.Tensor | float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qt.shape
        self.spec = qt.spec
        self.qt = qt
        # Some architectures (Gemma) scale the looked-up rows; keep the source module's factor.
        self.embed_scale = embed_scale

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Moving the module moves the quantized table (it is not a parameter); dtypes are kept."""
        super()._apply(fn, recurse)
        target = fn(torch.empty(0, device=self.qt.codes.device)).device  # .half() keeps the device
        if self.qt.codes.device != target:
            self.qt = self.qt.to(target)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qt.rows(ids.reshape(-1)).dequantize()  # [n, dim]
        out = rows.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, spec={self.spec}"
