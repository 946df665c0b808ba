"""Bitsmith inside other libraries' front doors: :mod:`~bitsmith.integrations.transformers` (a quantizer
registered with transformers, so ``AutoModelForCausalLM.from_pretrained(<bitsmith checkpoint>)``
builds bitsmith's packed layers) and :mod:`~bitsmith.integrations.hook` (the torch-free import hook
that registers it without importing transformers at ``import bitsmith``). Import the submodules
directly; this package imports nothing."""
