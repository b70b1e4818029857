"""quantization/modules.py: DynamicQuantLinear conversion, accuracy, gradients and rebuilding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core import structure
from torchslim.quantization.modules import DynamicQuantLinear
from torchslim.quantization.primitives import int8_linear


def _linear(k: int = 96, n: int = 48, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias)


def test_from_linear_stores_int8_and_to_linear_gives_the_dequantized_weight() -> None:
    linear = _linear()
    q = DynamicQuantLinear.from_linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (48, 96)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (48,)
    assert set(dict(q.named_parameters())) == {"bias"}  # the weight is a buffer now
    back = q.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float32
    assert bool(((back.weight - linear.weight).abs() <= q.scale[:, None] / 2 * (1 + 1e-5)).all())
    assert torch.equal(back.bias, linear.bias)
    assert torch.equal(DynamicQuantLinear.from_linear(back).qweight, q.qweight)  # stable under requantizing


@pytest.mark.parametrize("shape", [(64, 96), (3, 17, 96)])
def test_output_is_close_to_the_float_linear(shape: tuple[int, ...]) -> None:
    linear = _linear()
    q = DynamicQuantLinear.from_linear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        out, expected = q(x), linear(x)
    assert out.shape == expected.shape
    assert float((out - expected).norm() / expected.norm()) < 0.02
    assert float(F.cosine_similarity(out.flatten(), expected.flatten(), dim=0)) > 0.999


def test_per_tensor_mode_and_no_bias() -> None:
    linear = _linear(bias=False)
    q = DynamicQuantLinear.from_linear(linear, per_channel=False)
    assert q.bias is None and bool((q.scale == q.scale[0]).all())
    x = torch.randn(8, 96)
    with torch.no_grad():
        out, expected = q(x), linear(x)
    assert float((out - expected).norm() / expected.norm()) < 0.03


def test_per_tensor_inference_packs_for_fbgemm_once_and_repacks_after_a_change() -> None:
    q = DynamicQuantLinear.from_linear(_linear(), per_tensor=True).eval()
    x = torch.randn(5, 7, 96)
    through_op = q(x)  # the bias wants gradients: the custom op, which autograd can follow
    through_op.sum().backward()
    assert q.bias is not None and q.bias.grad is not None and q._fbgemm is None
    with torch.no_grad():
        fused = q(x)
        if q._fbgemm is None:
            pytest.skip("fbgemm is not the quantized engine of this build")
        torch.testing.assert_close(fused, through_op.detach(), rtol=1e-5, atol=1e-5)
        packed = q._fbgemm
        assert q(x).equal(fused) and q._fbgemm is packed  # packed once
        q.bias.add_(1.0)  # an in-place change must reach the packed copy of the bias
        torch.testing.assert_close(q(x), fused + 1.0, rtol=1e-5, atol=1e-5)
        assert q._fbgemm is not packed
    assert copy.deepcopy(q)._fbgemm is None  # the opaque object is a cache, never copied


def test_from_a_meta_linear_copies_nothing() -> None:
    with torch.device("meta"):
        linear = nn.Linear(8, 4)
    q = DynamicQuantLinear.from_linear(linear)
    assert q.qweight.is_meta and q.qweight.dtype == torch.int8 and q.bias is not None and q.bias.is_meta


def test_gradients_pass_straight_through() -> None:
    linear = _linear()
    q = DynamicQuantLinear.from_linear(linear)
    x = torch.randn(5, 96, requires_grad=True)
    grad_out = torch.randn(5, 48)
    q(x).backward(grad_out)
    assert x.grad is not None and q.bias is not None and q.bias.grad is not None
    torch.testing.assert_close(x.grad, grad_out @ q.to_linear().weight)
    torch.testing.assert_close(q.bias.grad, grad_out.sum(0))


@pytest.mark.parametrize("kind", [{"per_channel": False}, {"per_tensor": True}])
def test_structure_json_rebuilds_a_module_with_identical_outputs(kind: dict[str, bool]) -> None:
    q = DynamicQuantLinear.from_linear(_linear(), **kind)
    spec = json.loads(json.dumps(structure.module_spec(q)))
    model = nn.Sequential(_linear())
    structure.replay(model, [{"fqn": "0", "module": spec}])
    rebuilt = model[0]
    assert isinstance(rebuilt, DynamicQuantLinear)
    assert (rebuilt.per_channel, rebuilt.per_tensor) == (q.per_channel, q.per_tensor) == (
        kind.get("per_channel", True), kind.get("per_tensor", False))
    rebuilt.load_state_dict(q.state_dict(), strict=True)
    x = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), q(x))


def test_packed_weight_cache_follows_the_weight_and_is_never_copied() -> None:
    torch.manual_seed(0)
    q = DynamicQuantLinear.from_linear(nn.Linear(1024, 1024))
    x = torch.randn(8, 1024)
    with torch.no_grad():
        first = q(x)
    clone = copy.deepcopy(q)  # the opaque oneDNN tensor cannot be deep-copied: it is dropped
    assert clone._packed is None
    q.load_state_dict(DynamicQuantLinear.from_linear(nn.Linear(1024, 1024)).state_dict())
    with torch.no_grad():
        assert not torch.equal(q(x), first), "a stale packed weight was used after loading"
        torch.testing.assert_close(q(x), int8_linear(x, q.qweight, q.scale, q.bias), rtol=0, atol=0)
        torch.testing.assert_close(clone(x), first, rtol=0, atol=0)
