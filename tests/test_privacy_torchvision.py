"""The engine on torchvision's own models, built from small configurations
(nothing downloaded), every parameter trainable, against float64 torch.func
per-example gradients: ViT (nn.MultiheadAttention), Swin (F.linear on its
layers' weights from a function, relative position bias tables), ConvNeXt
(LayerNorm2d, layer scales), MaxViT, and ResNet, RegNet, EfficientNet and
MobileNet after privacy.convert.replace_batchnorm. In eval mode where the model
has dropout or stochastic depth (torch.func's vmap refuses random operators);
the engine's arithmetic is the same in both modes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privacy import PrivacyEngine
from privacy.convert import replace_batchnorm
from tests.privacy_helpers import assert_engine_matches_reference

tvm = pytest.importorskip("torchvision.models")

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CLASSES, BATCH = 5, 6


class PerExampleLoss(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images, labels):
        return F.cross_entropy(self.classifier(images), labels, reduction="none")


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
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(BATCH, 3, size, size, generator=generator),
              torch.randint(0, CLASSES, (BATCH,), generator=generator))
    return PerExampleLoss(classifier).eval(), inputs


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_matches_per_example_reference(name):
    assert_engine_matches_reference(*build(name))


def test_swin_v2_is_refused_by_name():
    """Swin V2 zeroes part of a copy of its qkv bias before F.linear: that bias is
    used outside its layer, which the engine cannot make exact; it says where."""
    model = PerExampleLoss(swin(2))
    engine = PrivacyEngine(model, 1.0, 0.0, 1.0)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"classifier\.features\.\d\.\d\.attn\.qkv\.(weight|bias) is used outside"):
        engine.backward(model(images, torch.zeros(2, dtype=torch.long)))
