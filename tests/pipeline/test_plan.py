"""The quantize plan and the registries: the user's method spelling is parsed in one place, the
registries answer what each method and transform needs, and the tied-head rule holds."""

import pytest

from bitsmith.methods import METHODS, Needs, method_info, needs_calibration
from bitsmith.pipeline.plan import QuantizePlan, parse_method
from bitsmith.spec import QuantSpec
from bitsmith.transforms import TRANSFORMS, get_transform, transform_option

SPEC = QuantSpec.parse("w4g32")


def test_methods_register_what_they_need() -> None:
    assert {"rtn", "hqq", "gptq"} <= set(METHODS)
    assert method_info("gptq").needs is Needs.HESSIAN and needs_calibration("gptq")
    assert not needs_calibration("rtn") and not needs_calibration("hqq")
    assert method_info("hqq").options is not None and method_info("gptq").options is not None
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        needs_calibration("awq")  # a transform, not a method


def test_awq_registers_as_a_transform_that_owns_its_options() -> None:
    awq = get_transform("awq")
    assert awq.needs is Needs.BLOCK_REPLAY and "awq" in TRANSFORMS
    assert transform_option("awq") and transform_option("awq_grid") and not transform_option("clip_search")


@pytest.mark.parametrize(("method", "options", "quantizer", "transforms", "run_options"), [
    ("rtn", {}, "rtn", (), {}),
    ("gptq", {"clip_search": False}, "gptq", (), {"clip_search": False}),
    ("awq", {}, "rtn", ("awq",), {"clip_search": False}),
    ("awq", {"quantizer": "gptq", "clip_search": True}, "gptq", ("awq",), {"clip_search": True, "quantizer": "gptq"}),
    ("gptq", {"awq": True}, "gptq", ("awq",), {"clip_search": False, "awq": True}),
])
def test_method_spelling_is_parsed_into_quantizer_and_transforms(method, options, quantizer, transforms, run_options) -> None:
    assert parse_method(method, options) == (quantizer, transforms, run_options)
    plan = QuantizePlan(SPEC, method, options)
    assert (plan.quantizer, plan.transforms, plan.run_options) == (quantizer, transforms, run_options)
    assert plan.options == options  # the user's options are kept as given
    assert list(plan.run_options) == list(run_options)  # key order: the checkpoint's JSON


def test_method_options_leave_out_the_plan_and_transform_keys() -> None:
    plan = QuantizePlan(SPEC, "awq", {"quantizer": "gptq", "awq_grid": 4, "damp_percent": 0.02})
    assert plan.method_options() == {"clip_search": False, "damp_percent": 0.02}


def test_needs_calibration_comes_from_the_registries() -> None:
    assert not QuantizePlan(SPEC, "hqq").needs_calibration
    assert QuantizePlan(SPEC, "gptq").needs_calibration
    assert QuantizePlan(SPEC, "awq").needs_calibration
    assert QuantizePlan(SPEC, "rtn", {"awq": True}).needs_calibration


def test_tied_head_rule() -> None:
    tied, untied = ["model.embed_tokens.weight"], ["model.embed_tokens.weight", "lm_head.weight"]
    head = QuantizePlan(SPEC, quantize_head=True)
    both = QuantizePlan(SPEC, quantize_head=True, quantize_embeddings=True)
    assert head.unties_head(tied) and not head.unties_head(untied)
    assert not both.unties_head(tied)  # the head computes from the quantized embedding
    assert head.quantizes_own_head(tied) and both.quantizes_own_head(untied) and not both.quantizes_own_head(tied)
    assert not QuantizePlan(SPEC).quantizes_own_head(untied)
