"""The engine on torchvision's own models, built from small configurations
(nothing downloaded), every parameter trainable, against float64 torch.func
per-example gradients: ViT (nn.MultiheadAttention), Swin (F.linear on its
layers' weights from a function, relative position bias tables), Swin V2 (the
key third of a clone of its qkv bias zeroed in place before F.linear, a logit
scale clamped and exponentiated, a position bias MLP on a buffer), ConvNeXt
(LayerNorm2d, layer scales), MaxViT, and ResNet, RegNet, EfficientNet and
MobileNet after privacy.convert.replace_batchnorm. In eval mode where the model
has dropout or stochastic depth (torch.func's vmap refuses random operators);
the engine's arithmetic is the same in both modes.
"""

import pytest
import torch
from torch import nn

from privacy import PrivacyEngine
from privacy.convert import replace_batchnorm
from tests.helpers.privacy import PerExampleLoss, assert_engine_matches_reference, classification_batch

tvm = pytest.importorskip("torchvision.models")

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CLASSES, BATCH = 5, 6


def swin(version: int):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    # 16x16 then 8x8 tokens in windows of 4x4, every second block shifted
    return SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.0, num_classes=CLASSES, **v2)


def convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0,
                    layer_scale=0.5, num_classes=CLASSES)  # torchvision's 1e-6 would leave blocks near zero


def maxvit():
    return tvm.maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                             block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES)


def regnet():
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8), stem_width=8,
                  num_classes=CLASSES)


def efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1), MBConvConfig(4, 5, 2, 16, 16, 1)]
    return EfficientNet(setting, dropout=0.0, last_channel=32, num_classes=CLASSES)


# name -> (builder, image size, BatchNorm to convert)
MODELS = {
    "vit": (lambda: tvm.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                          mlp_dim=16, num_classes=CLASSES), 16, False),
    "swin_v1": (lambda: swin(1), 32, False),
    "swin_v2": (lambda: swin(2), 32, False),
    "convnext": (convnext, 32, False),
    "maxvit": (maxvit, 32, True),
    "resnet": (lambda: tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES), 32, True),
    "regnet": (regnet, 32, True),
    "efficientnet": (efficientnet, 32, True),
    # 64 px: 2x2 at the last stage (GroupNorm needs more than one value per group)
    "mobilenet_v3": (lambda: tvm.mobilenet_v3_small(width_mult=0.25, num_classes=CLASSES), 64, True),
}


def build(name: str):
    builder, size, batchnorm = MODELS[name]
    torch.manual_seed(0)
    classifier = builder()
    if batchnorm:
        assert replace_batchnorm(classifier)
    return PerExampleLoss(classifier).eval(), classification_batch(BATCH, size, CLASSES)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_matches_per_example_reference(name):
    assert_engine_matches_reference(*build(name))


class InPlace(nn.Module):
    """A bare parameter changed in place (``where="parameter"``), or a value
    computed from it changed in place before (``"before"``: Swin V2's zeroed
    bias third) or after (``"after"``) it met the batch."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.linear = nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, x):
        if self.where == "parameter":
            self.shift.mul_(2)
        shift = self.shift * 2
        if self.where == "before":
            shift[1:3].zero_()
        y = self.linear(x) + shift
        if self.where == "after":
            shift.mul_(3)
        return y.square().sum((1, 2))


def test_a_value_computed_from_a_bare_parameter_changed_in_place_is_exact():
    x = torch.randn(BATCH, 3, 4, generator=torch.Generator().manual_seed(1))
    assert_engine_matches_reference(InPlace("before"), (x,))


@pytest.mark.parametrize("where, match", [
    ("parameter", r"shift \(a bare parameter.* meets the batch in mul_ in place on the parameter"),
    ("after", r"shift: a value computed from it was changed in place after it met the batch in add"),
])
def test_a_bare_parameter_changed_in_place_or_after_its_use_is_refused(where, match):
    model = InPlace(where)
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    with pytest.raises(ValueError, match=match):
        engine.backward(model(torch.randn(4, 3, 4)))
