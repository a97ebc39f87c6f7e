import pytest
import torch

from fl_core.config import ModelConfig
from fl_core.models import ResNet8, build_model, inference_model


def test_resnet8_is_creffs_resnet8():
    model = ResNet8(num_classes=10, in_channels=3, width=1.0)
    # CReFF's ResNet_cifar(resnet_size=8, scaling=4): conv1, three basic blocks, 256->10 classifier
    expected = (3 * 64 * 9 + 128  # conv1 + bn1
                + 2 * 64 * 64 * 9 + 2 * 128  # layer1
                + 64 * 128 * 9 + 128 * 128 * 9 + 2 * 256 + 64 * 128 + 256  # layer2 + downsample
                + 128 * 256 * 9 + 256 * 256 * 9 + 2 * 512 + 128 * 256 + 512  # layer3 + downsample
                + 256 * 10 + 10)  # classifier
    assert sum(p.numel() for p in model.parameters()) == expected
    features, logits = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 256) and logits.shape == (2, 10)


def test_clip2fl_variant_has_the_256_to_512_layer():
    model = build_model(ModelConfig(arch="resnet8_clip2fl"), "cifar10", 10, 3, seed=0)
    assert (model.projection.in_features, model.projection.out_features) == (256, 512)
    features, logits = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512) and logits.shape == (2, 10)


def test_width_scales_channels_and_any_image_size_works():
    model = ResNet8(num_classes=7, in_channels=1, width=0.25)
    features, logits = model(torch.randn(3, 1, 28, 28))
    assert features.shape == (3, 64) and logits.shape == (3, 7)


def test_resnet50_wrapper():
    model = build_model(ModelConfig(arch="auto"), "imagenet_lt", 5, 3, seed=0)
    assert model.feature_dim == 2048 and isinstance(model.classifier, torch.nn.Linear)
    model.eval()
    features, logits = model(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 2048) and logits.shape == (1, 5)


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(width=0.25), "mnist", 10, 1, seed=5)
    assert torch.equal(torch.rand(1), before)
    b = build_model(ModelConfig(width=0.25), "mnist", 10, 1, seed=5)
    c = build_model(ModelConfig(width=0.25), "mnist", 10, 1, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


def test_unknown_arch():
    with pytest.raises(ValueError, match="choose one of"):
        build_model(ModelConfig(arch="vit"), "mnist", 10, 1, seed=0)


@pytest.mark.parametrize("arch", ["resnet8", "resnet8_clip2fl", "resnet50"])
def test_inference_model_folds_batchnorm_and_computes_the_same_function(arch):
    dataset = "imagenet_lt" if arch == "resnet50" else "cifar10"
    model = build_model(ModelConfig(arch=arch, width=0.25), dataset, 10, 3, seed=0).double()  # rounding aside
    with torch.no_grad():  # running statistics far from the initial ones, so that folding has work to do
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    fast = inference_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        got = fast(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the model itself is left as it was
    assert model.training and all(p.requires_grad and p.is_contiguous() for p in model.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_inference_model_of_a_model_fx_cannot_trace_is_an_unfused_copy():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: symbolic tracing fails
                x = -x
            return self.bn(self.conv(x))

    model = DataDependent()
    fast = inference_model(model)
    assert isinstance(fast.bn, torch.nn.BatchNorm2d) and not fast.training and model.training
    x = torch.randn(2, 1, 5, 5)
    model.eval()
    torch.testing.assert_close(fast(x), model(x))
