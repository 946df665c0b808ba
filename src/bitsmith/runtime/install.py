"""Swap quantized modules into a model: the one place that decides which module computes a quantized
layer. An embedding becomes a QuantEmbedding (and a tied output head a QuantLinear over the same codes);
every other layer a QuantLinear, built straight from a checkpoint's packed codes where it can (no
unpack/repack), or from an unpacked QuantizedTensor (imported formats, non-uniform grids), wrapped in
an input permutation for GPTQ act-order layers. Used by the loader for bitsmith checkpoints and GPTQ /
GGUF imports, and by the offloader for each streamed block (so both build identical modules)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bitsmith.nn.qembedding import QuantEmbedding, packable_spec, packed_embedding, shared_codes
from bitsmith.hadamard import Rotation
from bitsmith.io.packed import layer_rotation
from bitsmith.nn.qlinear import InputRotated, QuantLinear, set_submodule
from bitsmith.runtime.options import RuntimeOptions
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

__all__ = ["QuantizedLayer", "install_quantized"]


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer's quantized weights: the packed tensors a checkpoint stores (``parts``: ``qweight``,
    ``scale``, optional ``zero`` and ``grid``) or an unpacked ``tensor``; ``perm`` permutes the input
    channels first (GPTQ act-order: the codes are stored over group-sorted channels)."""

    spec: QuantSpec
    in_features: int
    parts: Mapping[str, torch.Tensor] | None = None
    tensor: QuantizedTensor | None = None
    perm: torch.Tensor | None = None
    rotation_block: int | None = None  # packed parts of a rotated layer (``rot_signs``): its Hadamard block

    @classmethod
    def of(cls, qt: QuantizedTensor, perm: torch.Tensor | None = None) -> QuantizedLayer:
        return cls(qt.spec, qt.shape[1], tensor=qt, perm=perm)

    def rotation(self) -> Rotation | None:
        if self.tensor is not None:
            return self.tensor.rotation
        return layer_rotation(dict(self.parts), self.in_features, self.rotation_block)

    def unpacked(self) -> QuantizedTensor:
        if self.tensor is not None:
            return self.tensor
        p = self.parts
        return QuantizedTensor.from_state(p["qweight"], p["scale"], p.get("zero"), self.spec, self.in_features, p.get("grid"),
                                          self.rotation())

    def linear(self, bias: torch.Tensor | None, options: RuntimeOptions) -> nn.Module:
        """The module computing ``x W^T + bias`` from these weights."""
        if self.tensor is not None or "grid" in self.parts:  # non-uniform grids go through the unpacked tensor
            layer = QuantLinear(self.unpacked(), bias, options)
        else:  # straight from the packed codes: no unpack/repack
            p = self.parts
            layer = QuantLinear.from_state(p["qweight"], p["scale"], p.get("zero"), self.spec, self.in_features, bias, options)
        rotation = self.rotation()
        if rotation is not None:  # the kernel computes in the rotated basis; the fused decode path skips these
            layer = InputRotated(layer, rotation)
        if self.perm is None:
            return layer
        from bitsmith.io.import_gptq import InputPermuted

        return InputPermuted(layer, self.perm)


def loaded_bias(module: nn.Module) -> torch.Tensor | None:
    """A linear's bias as loaded (None when it has none or it was never materialised off the meta device)."""
    bias = getattr(module, "bias", None)
    return None if bias is None or bias.is_meta else bias.detach()


def _embedding_from_parts(layer: QuantizedLayer, tied: bool, options: RuntimeOptions, embed_scale,
                          ) -> tuple[QuantEmbedding, nn.Module | None] | None:
    """An embedding (and its tied head) straight from a checkpoint's packed codes below 8 bits: never
    unpacked to a byte per code (a 151936 x 1536 table would be 233 MB more for the load's duration)."""
    if layer.parts is None or layer.perm is not None or layer.rotation() is not None or not packable_spec(layer.spec):
        return None
    head = layer.linear(None, options) if tied else None  # a plain QuantLinear over the packed codes here
    return packed_embedding(layer.parts, layer.spec, layer.in_features, head, embed_scale), head


def install_quantized(net: nn.Module, layers: Mapping[str, QuantizedLayer], tied_head: bool,
                      options: RuntimeOptions) -> None:
    """Replace each named module of ``net`` by the quantized module computing from ``layers[name]``;
    with ``tied_head``, a quantized input embedding also becomes the output head (same codes)."""
    for name, layer in layers.items():
        old = net.get_submodule(name)
        if isinstance(old, nn.Embedding):
            tied = tied_head and isinstance(net.get_output_embeddings(), nn.Linear)
            built = _embedding_from_parts(layer, tied, options, getattr(old, "embed_scale", None))
            if built is None:
                qt = layer.unpacked()
                head = QuantLinear(qt, options=options) if tied else None  # computes from the same table
                # held packed, in the tied head's own bytes where its kernel has them in the natural layout
                built = QuantEmbedding(qt, getattr(old, "embed_scale", None), shared_codes(head, qt)), head
            emb, head = built
            if head is not None:
                net.set_output_embeddings(head)
            set_submodule(net, name, emb)
            continue
        set_submodule(net, name, layer.linear(loaded_bias(old), options))
