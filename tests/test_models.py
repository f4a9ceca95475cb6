"""Every registered network meets the assignment's constraints, checked on the model object itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinycifar.models import MODEL_REGISTRY, count_params, create_model, register_model
from tinycifar.models.layers import SqueezeExcite
from tinycifar.models.rules import check
from tinycifar.models.summary import receptive_field, receptive_field_walk


@pytest.fixture(scope="module")
def era9() -> nn.Module:
    torch.manual_seed(0)
    return create_model("era9").eval()


@pytest.fixture(scope="module", params=sorted(MODEL_REGISTRY))
def net(request) -> nn.Module:
    torch.manual_seed(0)
    return create_model(request.param).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


def convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_every_network_has_fewer_than_200k_parameters(net):
    params = count_params(net)
    assert params < 200_000
    assert params == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_every_network_has_no_max_pooling(net):
    assert not any(isinstance(m, (nn.MaxPool2d, nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool2d))
                   for m in net.modules())


def test_every_network_has_a_depthwise_conv_followed_by_a_pointwise_conv(net):
    layers = convs(net)
    pairs = [(a, b) for (_, a), (_, b) in zip(layers, layers[1:], strict=False)
             if a.groups == a.in_channels > 1 and a.out_channels == a.in_channels
             and b.kernel_size == (1, 1) and b.groups == 1 and b.in_channels == a.out_channels]
    assert pairs, "no depthwise conv followed by a 1x1 conv"


def test_every_network_has_a_dilated_conv(net):
    assert any(max(m.dilation) > 1 for _, m in convs(net))


def test_every_network_downsamples_only_with_strided_convs(net):
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
                   for m in net.features.modules())
    with torch.no_grad():
        fmap = net.features(torch.zeros(2, 3, 32, 32))
    strided = [m for _, m in convs(net) if max(m.stride) > 1]
    assert fmap.shape[-1] == 32 // 2 ** len(strided)


def test_era9_downsamples_only_with_strided_convs(era9):
    """No pooling inside the features; every stride > 1 is on a conv; the map goes 32 -> 4."""
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
                   for m in era9.features.modules())
    strided = [m for _, m in convs(era9) if max(m.stride) > 1]
    assert len(strided) == 3
    with torch.no_grad():
        fmap = era9.features(torch.zeros(2, 3, 32, 32))
    assert fmap.shape[-2:] == (4, 4)


def test_every_network_ends_with_global_average_pooling_then_linear_to_10(net):
    leaves = [m for m in net.modules() if not list(m.children())]
    pool_at = max(i for i, m in enumerate(leaves) if isinstance(m, nn.AdaptiveAvgPool2d))
    assert leaves[pool_at].output_size in (1, (1, 1))
    after = [m for m in leaves[pool_at + 1:] if not isinstance(m, nn.Flatten)]
    assert len(after) == 1 and isinstance(after[0], nn.Linear)
    assert after[0].out_features == 10
    assert isinstance(leaves[-1], nn.Linear)


def test_every_network_has_a_receptive_field_above_44(net):
    assert receptive_field(net) > 44
    rfs = [s.rf for s in receptive_field_walk(net)]
    assert rfs == sorted(rfs)


@pytest.mark.parametrize("batch", [1, 3])
def test_era9_output_shape(era9, batch):
    with torch.no_grad():
        out = era9(torch.randn(batch, 3, 32, 32))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


def test_era9_num_classes_and_dropout_options():
    m = create_model("era9", num_classes=7, dropout=0.0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert not any(isinstance(x, nn.Dropout2d) for x in m.modules())
    assert any(isinstance(x, nn.Dropout2d) for x in create_model("era9", dropout=0.1).modules())


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registered_model_classifies_cifar_shapes(name):
    model = create_model(name).eval()
    assert model.name == name
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert hasattr(model, "features") and hasattr(model, "head")
    assert (MODEL_REGISTRY[name].__doc__ or "").strip(), "registered models need a one-line description"


def test_unknown_model_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model 'nope'.*era9"):
        create_model("nope")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("era9")(lambda: nn.Linear(1, 1))
    assert MODEL_REGISTRY["era9"].__name__ == "era9"


@pytest.mark.parametrize("name, params", [("slimres50k", 51_258), ("slimres100k", 111_442), ("slimres200k", 194_666)])
def test_slimres_family_sizes_match_their_names_and_docstrings(name, params):
    model = create_model(name)
    assert count_params(model) == params
    assert f"{params:,}" in MODEL_REGISTRY[name].__doc__
    assert receptive_field(model) == 61


@pytest.mark.parametrize("name, params", [("slimres50k", 52_418), ("slimres100k", 113_950), ("slimres200k", 199_034)])
def test_slimres_with_squeeze_excitation_keeps_every_rule(name, params):
    model = create_model(name, se_reduction=16)
    assert count_params(model) == params < 200_000
    report = check(model)
    assert report.passed, report.format()
    assert receptive_field(model) == 61  # the gate's global mean does not widen the field
    assert f"{params:,}" in MODEL_REGISTRY[f"{name}_se"].__doc__


@pytest.mark.parametrize("name", ["slimres50k", "slimres100k", "slimres200k"])
def test_the_se_variants_are_the_family_with_se_reduction_16(name):
    """Runs recorded as slimres200k + se_reduction=16 and runs of slimres200k_se are one network."""
    torch.manual_seed(3)
    named = create_model(f"{name}_se", num_classes=7)
    torch.manual_seed(3)
    spelled_out = create_model(name, num_classes=7, se_reduction=16)
    assert named.state_dict().keys() == spelled_out.state_dict().keys()
    assert all(torch.equal(named.state_dict()[k], v) for k, v in spelled_out.state_dict().items())


def test_squeeze_excite_scales_each_channel_by_a_gate_from_the_whole_map():
    torch.manual_seed(0)
    se = SqueezeExcite(8, 2)
    x = torch.randn(2, 8, 5, 5)
    out = se(x)
    ratio = out / x
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-5)  # one factor per channel
    assert ((ratio > 0) & (ratio < 1)).all()
    shifted = x.clone()
    shifted[0, :, 0, 0] += 10  # one pixel moves every channel's gate of that image only
    assert not torch.allclose(se(shifted)[0, :, 4, 4], out[0, :, 4, 4])
    assert torch.allclose(se(shifted)[1], out[1])


def test_fastnet_without_its_16x16_block_keeps_every_rule():
    lite, full = create_model("fastnet", block16=False), create_model("fastnet")
    report = check(lite)
    assert report.passed, report.format()
    assert (report.params, report.receptive_field) == (173_002, 49)
    assert count_params(full) - count_params(lite) == sum(p.numel() for p in full.features[1][0].parameters())
    assert len(lite.features[1]) == 1 and lite(torch.randn(2, 3, 32, 32)).shape == (2, 10)
