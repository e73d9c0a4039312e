"""The dispatch rule and the demonstration kernel (softmax with temperature) end to end."""

from __future__ import annotations

import pytest
import torch

from tokenlab.backend import resolve_backend
from tokenlab.kernels import temperature_softmax
from tokenlab.testing import relative_error


def test_auto_picks_reference_on_cpu():
    assert resolve_backend("auto", x=torch.zeros(2)) == "reference"
    assert resolve_backend("reference", x=torch.zeros(2)) == "reference"


def test_triton_on_cpu_runs_under_interpreter():
    # conftest sets TRITON_INTERPRET=1
    assert resolve_backend("triton", x=torch.zeros(2)) == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"`backend`='triton' needs CUDA"):
        resolve_backend("triton", x=torch.zeros(2))
    with pytest.raises(ValueError, match="`backend`"):
        temperature_softmax(torch.zeros(2, 3), backend="triton")


@pytest.mark.parametrize("bad", ["cuda", "Triton", None, 3])
def test_unknown_backend(bad):
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve_backend(bad, x=torch.zeros(1))


def test_non_tensor_input_names_the_argument():
    with pytest.raises(TypeError, match=r"`logits` must be a torch\.Tensor"):
        temperature_softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="`q`"):
        resolve_backend("auto", q=[1.0], k=torch.zeros(1))


def test_mixed_devices_rejected():
    meta = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", a=torch.zeros(1), b=meta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature`"):
        temperature_softmax(torch.zeros(2, 3), temperature)


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        temperature_softmax(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 1000), (4, 4097)])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_kernel_equals_reference_float64(shape, temperature):
    gen = torch.Generator().manual_seed(hash((shape, temperature)) % 2**31)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 5
    out = temperature_softmax(x, temperature, backend="triton")
    ref = temperature_softmax(x, temperature, backend="reference")
    assert out.dtype == torch.float64
    assert relative_error(out, ref) < 1e-12
    torch.testing.assert_close(ref, torch.softmax(x / temperature, -1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_kernel_low_precision(dtype, tol):
    x = (torch.randn(3, 777, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    out = temperature_softmax(x, 0.8, backend="triton")
    assert out.dtype == dtype
    assert relative_error(out, torch.softmax(x.double() / 0.8, -1)) < tol


def test_kernel_masked_logits():
    x = torch.randn(2, 300, dtype=torch.float64)
    x[0, :250] = float("-inf")  # whole first blocks masked, as top-k filtering does
    x[1, ::2] = float("-inf")
    out = temperature_softmax(x, 1.3, backend="triton")
    ref = torch.softmax(x / 1.3, -1)
    assert relative_error(out, ref) < 1e-12
    assert torch.all(out[x == float("-inf")] == 0)


def test_triton_has_no_backward():
    x = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(ValueError, match="backward"):
        temperature_softmax(x, backend="triton")
    temperature_softmax(x, backend="reference").sum().backward()
