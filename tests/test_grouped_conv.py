"""``fl_core.fl.grouped_conv`` (Triton) against ``F.conv2d``: outputs, input and weight gradients.
On FL_CORE_TEST_DEVICE: a GPU, or on a CPU Triton's interpreter (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fl_core.fl.stacked import stacked_skeleton
from fl_core.models import ResNet8

pytest.importorskip("triton")

from fl_core.fl.grouped_conv import grouped_conv2d  # noqa: E402

from conftest import NEEDS_CUDA, TEST_DEVICE  # noqa: E402

# groups, input and output channels per group, side, kernel, stride, padding, batch, channels-last;
# covering ResNet-8's convolutions (3x3 stride 1 and 2, 1x1 stride 2 shortcuts, a 1-channel stem),
# block edges (17 output channels), odd sides, and a weight gradient split over pixel chunks (the 4th)
GEOMETRIES = [(2, 3, 5, 5, 3, 1, 1, 2, False), (3, 4, 6, 7, 3, 2, 1, 2, True), (2, 5, 4, 6, 1, 2, 0, 3, True),
              (2, 2, 3, 16, 3, 1, 1, 4, True), (2, 1, 17, 6, 3, 1, 1, 2, False)]


def conv_and_grads(conv, x, weight, dy, stride, padding, groups):
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y = conv(x, weight, stride, padding, groups)
    y.backward(dy)
    return y, x.grad, weight.grad


def torch_conv(x, weight, stride, padding, groups):
    return F.conv2d(x, weight, None, stride, padding, groups=groups)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"g{g[0]}-{g[1]}to{g[2]}-k{g[4]}s{g[5]}" for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_grouped_conv_equals_torch_conv(geometry, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # both in full float32
    groups, cin, cout, side, kernel, stride, padding, batch, channels_last = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, groups * cin, side, side, generator=g, dtype=dtype).to(TEST_DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(groups * cout, cin, kernel, kernel, generator=g, dtype=dtype).to(TEST_DEVICE)
    y = torch_conv(x, weight, stride, padding, groups)
    dy = torch.randn(y.shape, generator=g, dtype=dtype).to(TEST_DEVICE)
    ours = conv_and_grads(grouped_conv2d, x, weight, dy, stride, padding, groups)
    reference = conv_and_grads(torch_conv, x, weight, dy, stride, padding, groups)
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, reference):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max() <= tolerance * b.abs().max(), name



def test_a_one_channel_input_gives_a_channels_last_output():
    """A single client's images (one channel) are contiguous and channels-last at once; the output is
    channels-last, so a one-member bucket's layers run the kernels compiled for the others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    weight = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    y = grouped_conv2d(x, weight, 1, 1, 1)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.allclose(y, torch_conv(x, weight, 1, 1, 1), rtol=1e-12, atol=1e-12)


def test_torch_compile_traces_the_convolution_as_one_opaque_call():
    """Under torch.compile (whole graph, no breaks) the forward pass and both gradients are eager's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * 3, 7, 7, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(2 * 4, 3, 3, 3, generator=g, dtype=torch.float64).to(TEST_DEVICE)

    def loss(x, weight):
        return torch.relu(grouped_conv2d(x, weight, 2, 1, 2)).square().sum()

    def value_and_grads(fn):
        leaves = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        value = fn(*leaves)
        return value, *torch.autograd.grad(value, leaves)

    torch._dynamo.reset()
    compiled = value_and_grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    for name, a, b in zip(("loss", "input gradient", "weight gradient"), compiled, value_and_grads(loss)):
        assert torch.equal(a, b), name

@NEEDS_CUDA
def test_grouped_conv_under_bf16_autocast_is_rounded_like_cudnn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4 * 64, 14, 14, generator=g).to(TEST_DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4 * 128, 64, 3, 3, generator=g).to(TEST_DEVICE)
    dy = torch.randn(32, 4 * 128, 7, 7, generator=g).to(TEST_DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = conv_and_grads(grouped_conv2d, x, weight, dy, 2, 1, 4)
        reference = conv_and_grads(torch_conv, x, weight, dy, 2, 1, 4)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, reference):
        assert a.dtype == b.dtype, name
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max(), name


def test_grouped_conv_refuses_what_it_does_not_compute():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="inputs of one dtype"):
        grouped_conv2d(x, torch.randn(4, 2, 3, 3), 1, 1, 2)
    with pytest.raises(ValueError, match="do not match groups=3"):
        grouped_conv2d(x, torch.randn(6, 2, 3, 3, dtype=torch.float64), 1, 1, 3)


def test_stacked_resnet8_step_with_triton_convolutions_equals_torch_convolutions():
    """One training step's loss and weight gradients of three stacked ResNet-8s, float64."""
    clients, batch = 3, 2
    model = ResNet8(4, 1, 0.125).double()
    stack = {n: t.unsqueeze(0).repeat(clients, *[1] * t.dim()).to(TEST_DEVICE) for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, clients, 12, 12, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch * clients,), generator=g).to(TEST_DEVICE)
    weights = {n: t.clone().requires_grad_(True) for n, t in stack.items()
               if t.is_floating_point() and "running" not in n}

    def loss_and_grads(kernel):
        buffers = {n: t.clone() for n, t in stack.items() if n not in weights}
        _, logits = functional_call(stacked_skeleton(model, kernel), (weights, buffers), (x,))
        loss = F.cross_entropy(logits.reshape(batch * clients, 4), y)
        return loss, torch.autograd.grad(loss, list(weights.values()))

    (loss, grads), (reference_loss, reference_grads) = loss_and_grads("triton"), loss_and_grads("native")
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-12)
    for name, a, b in zip(weights, grads, reference_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-9), name
