"""RuntimeOptions: the one place the BITSMITH_* environment overrides are read, and what they mean."""

from __future__ import annotations

import dataclasses

import pytest

from bitsmith.runtime.options import ENV, RuntimeOptions


def test_defaults_are_the_fast_paths() -> None:
    assert RuntimeOptions.from_env({}) == RuntimeOptions()
    o = RuntimeOptions()
    assert (o.kernel, o.int8_decode, o.kv_cache, o.fused_decode, o.compile, o.threads) == ("auto", True, "fp16", True, None, None)


def test_environment_overrides() -> None:
    env = {"BITSMITH_KERNEL": " Reference ", "BITSMITH_INT8_DECODE": "0", "BITSMITH_KV_CACHE": "fp32",
           "BITSMITH_FUSED_DECODE": "off", "BITSMITH_COMPILE": "1", "BITSMITH_THREADS": "3"}
    assert RuntimeOptions.from_env(env) == RuntimeOptions("reference", False, "fp32", False, True, 3)
    assert RuntimeOptions.from_env({"BITSMITH_COMPILE": "no"}).compile is False
    assert RuntimeOptions.from_env({"BITSMITH_COMPILE": "auto", "BITSMITH_INT8_DECODE": "yes"}) == RuntimeOptions()
    assert set(ENV) == {f.name for f in dataclasses.fields(RuntimeOptions)}
    assert RuntimeOptions.from_env({"BITSMITH_DEVICE_KERNEL": "Generic"}).device_kernel == "generic"


@pytest.mark.parametrize("env,match", [({"BITSMITH_KERNEL": "fastest"}, "BITSMITH_KERNEL"),
                                       ({"BITSMITH_KV_CACHE": "int4"}, "BITSMITH_KV_CACHE"),
                                       ({"BITSMITH_THREADS": "many"}, "BITSMITH_THREADS"),
                                       ({"BITSMITH_DEVICE_KERNEL": "cublas"}, "BITSMITH_DEVICE_KERNEL")])
def test_bad_values_name_the_variable(env: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RuntimeOptions.from_env(env)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RuntimeOptions().kernel = "torch"  # type: ignore[misc]


def test_measurement_options_keep_the_exact_batched_matmul() -> None:
    """eval/compare/demo load with the exact prefill unless the user asked otherwise."""
    assert RuntimeOptions.for_measurement({}).prefill == "exact"
    assert RuntimeOptions.for_measurement({"BITSMITH_PREFILL": "bf16"}).prefill == "bf16"
    assert RuntimeOptions.for_measurement({"BITSMITH_KV_CACHE": "fp32"}).kv_cache == "fp32"
    assert RuntimeOptions.from_env({}).prefill == "auto"
