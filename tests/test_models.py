import pytest
import torch

from fl_core.config import ModelConfig
from fl_core.models import ResNet8, build_model


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
