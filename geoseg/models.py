"""Build the segmentation networks: DeepLabV3, FCN, U-Net and a tiny stand-in CNN.

Every network built here takes ``(N, in_channels, H, W)`` float32 and returns plain logits
``(N, num_classes, H, W)`` at the input's size (torchvision's dict output is unwrapped and the
auxiliary classifier dropped).  Any band count is accepted: the first convolution is replaced.

Pretrained weights are ImageNet backbone weights from torchvision's weights API, read from a local
file or the torch cache (``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``); nothing is
downloaded.  When they are missing, :class:`~geoseg.errors.WeightsNotFoundError` says which file to
put where.  Saving and loading trained networks with their contract lives in :mod:`geoseg.checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    WeightsEnum,
    resnet50,
    resnet101,
)
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from geoseg.config import BACKBONES
from geoseg.errors import CheckpointError, ConfigError, WeightsNotFoundError

log = logging.getLogger(__name__)

#: ASPP atrous rates for each DeepLabV3 output stride (DeepLabV3 paper: rates double when the stride halves).
ASPP_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}

#: The ImageNet weights each backbone starts from when ``pretrained=True``.
IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V2,
    "resnet101": ResNet101_Weights.IMAGENET1K_V2,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}

#: U-Net encoder depth (stages) for each output stride.
UNET_DEPTHS: dict[int, int] = {32: 5, 16: 4, 8: 3}

RGB = ("red", "green", "blue")

_TINY_RECEPTIVE_FIELD = 15


class SegmentationNet(nn.Module):
    """A torchvision-style ``backbone`` + ``classifier`` returning logits at the input size.

    Parameter names match torchvision's segmentation models (``backbone.*``, ``classifier.*``),
    without the auxiliary classifier.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` for ``x`` ``(N, C, H, W)``, upsampled bilinearly to ``H, W``."""
        features = self.backbone(x)["out"]
        logits = self.classifier(features)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Upsampled(nn.Module):
    """``net`` run on its input enlarged ``factor`` times (bilinear); logits come back at the input size.

    For coarse pixels (Landsat's 30 m) this gives a network of output stride ``s`` an effective stride
    of ``s / factor`` input pixels: class edges follow fields a few pixels wide.
    """

    def __init__(self, net: nn.Module, factor: int) -> None:
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` for ``x`` ``(N, C, H, W)``."""
        big = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return F.interpolate(self.net(big), size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_net(in_channels: int, num_classes: int) -> nn.Sequential:
    """A small plain CNN: the stand-in model for fast CPU tests and memory benchmarks.

    conv3x3 → ReLU → conv3x3 (dilation 2) → ReLU → conv3x3 (dilation 4) → ReLU → conv1x1, zero
    'same' padding, output stride 1.  Receptive field ``1 + 2*(1 + 2 + 4) = 15`` px.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=4, dilation=4),
        nn.ReLU(),
        nn.Conv2d(16, num_classes, 1),
    )


def receptive_field(arch: str) -> int | None:
    """Receptive field in input pixels, or ``None`` when it exceeds any tile.

    Only the tiny stand-in has a small, exact one (15 px).  DeepLabV3, FCN and U-Net on ResNet or
    MobileNetV3 see hundreds of pixels (ASPP image pooling even sees the whole tile), so they report
    ``None`` and :func:`geoseg.tiling.context_margin` takes the measured seam-free margin.
    """
    _check_arch(arch)
    return _TINY_RECEPTIVE_FIELD if arch == "tiny" else None


def required_stride(arch: str, output_stride: int = 32) -> int:
    """The multiple of which a tile's height and width must be (pad the input up to it).

    ``required_stride = 2 ** d`` where ``d`` is the number of stride-2 stages of the encoder:
    ResNet (conv1, maxpool, layer2, layer3, layer4) and MobileNetV3 (stem, C1..C4) have ``d = 5``,
    so 32.  Dilation replaces some strides in DeepLabV3/FCN (output stride 16 or 8, which divides
    32), so 32 is always safe there: every feature map is then exactly ``input / 2**k`` and the
    bilinear upsampling lines up with the pixels.  U-Net needs it exactly (its skip connections
    concatenate the feature maps of all its stages), and its ``output_stride`` is its depth: 32 (five
    stages), 16 or 8.  The tiny CNN has no stride: 1.  Pass this value as ``output_stride`` to
    :func:`geoseg.tiling.context_margin`.
    """
    _check_arch(arch)
    if arch == "tiny":
        return 1
    return output_stride if arch == "unet" else 32


def _check_arch(arch: str, backbone: str | None = None) -> None:
    if arch not in BACKBONES:
        raise ConfigError(f"unknown arch {arch!r}; valid archs are {', '.join(BACKBONES)}")
    if backbone is not None and backbone not in BACKBONES[arch]:
        raise ConfigError(
            f"backbone {backbone!r} is not available for {arch}; valid backbones for {arch} are "
            f"{', '.join(BACKBONES[arch])}"
        )


def build_model(
    arch: str,
    backbone: str,
    in_channels: int,
    num_classes: int,
    output_stride: int = 16,
    pretrained: bool = False,
    *,
    band_names: Sequence[str] | None = None,
    weights_path: str | Path | None = None,
    upsample: int = 1,
) -> nn.Module:
    """Build a segmentation network that returns logits ``(N, num_classes, H, W)``.

    Args:
        arch: ``deeplabv3``, ``fcn``, ``unet`` or ``tiny``.
        backbone: one of ``geoseg.config.BACKBONES[arch]`` (``none`` for ``tiny``).
        in_channels: number of input bands.
        num_classes: number of output classes.
        output_stride: 16 or 8 for DeepLabV3 and FCN (dilation replaces the last strides; the
            ASPP rates follow: 16 → 6/12/18, 8 → 12/24/36).  For U-Net the stride of its deepest
            stage: 32 (all five encoder stages), 16 or 8 (the last one or two dropped: fewer
            parameters, finer context for coarse pixels).  The tiny CNN ignores it.
        pretrained: start the backbone from ImageNet weights (see :data:`IMAGENET_WEIGHTS`),
            read from ``weights_path`` or the torch cache; never downloaded.
        band_names: the input bands in order; with ``pretrained``, bands named red/green/blue keep
            their ImageNet filters and the others start from the mean of the RGB filters.  When
            omitted, 3 bands are taken as red, green, blue and other counts use the mean for every band.
        weights_path: a local file holding the backbone's torchvision ImageNet state dict.
        upsample: run the network on the input enlarged this many times (bilinear) and return the
            logits at the input size (:class:`Upsampled`): at 28-30 m pixels, 2 halves the ground size
            of the output stride (8 px = 240 m becomes 120 m) for 4 x the compute.

    Raises:
        ConfigError: unknown arch or backbone (the message lists the valid ones), or a bad option.
        WeightsNotFoundError: ``pretrained`` was asked and the weights file is not there.
    """
    _check_arch(arch, backbone)
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    if arch in ("deeplabv3", "fcn") and output_stride not in ASPP_RATES:
        raise ConfigError(f"output_stride must be 8 or 16 for {arch}, got {output_stride}")
    if arch == "unet" and output_stride not in UNET_DEPTHS:
        raise ConfigError(f"output_stride must be 8, 16 or 32 for unet, got {output_stride}")
    if band_names is not None and len(band_names) != in_channels:
        raise ConfigError(f"{len(band_names)} band names given for {in_channels} input channels")
    if arch == "tiny":
        if pretrained:
            raise ConfigError("the tiny stand-in CNN has no pretrained weights; use pretrained=False")
        return tiny_net(in_channels, num_classes)

    state = _imagenet_state_dict(backbone, weights_path) if pretrained else None
    if arch == "unet":
        model = _unet(backbone, num_classes, output_stride, state)
    elif backbone == "mobilenet_v3_large":
        model = _deeplabv3_mobilenet(num_classes, output_stride, state)
    else:
        model = _torchvision_resnet_seg(arch, backbone, num_classes, output_stride, state)
    if pretrained or in_channels != 3:
        _replace_first_conv(model, in_channels, band_names if pretrained else None, pretrained)
    return Upsampled(model, upsample) if upsample > 1 else model


def _resnet_backbone(backbone: str, output_stride: int, state: dict | None) -> nn.Module:
    dilate = [False, output_stride == 8, True]
    make = resnet50 if backbone == "resnet50" else resnet101
    net = make(weights=None, replace_stride_with_dilation=dilate)
    if state is not None:
        _load(net, state, backbone)
    return IntermediateLayerGetter(net, return_layers={"layer4": "out"})


def _torchvision_resnet_seg(
    arch: str, backbone: str, num_classes: int, output_stride: int, state: dict | None
) -> SegmentationNet:
    body = _resnet_backbone(backbone, output_stride, state)
    if arch == "deeplabv3":
        head: nn.Module = DeepLabHead(2048, num_classes, ASPP_RATES[output_stride])
    else:
        head = FCNHead(2048, num_classes)
    return SegmentationNet(body, head)


def _deeplabv3_mobilenet(num_classes: int, output_stride: int, state: dict | None) -> SegmentationNet:
    """DeepLabV3 on MobileNetV3-Large features, dilated to output stride 16 (C4) or 8 (C3 and C4)."""
    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_large", dilated=True)
    if output_stride == 8:
        c3 = next(i for i, c in enumerate(setting) if c.stride > 1 and c.out_channels == 80)
        for cnf in setting[c3:]:
            cnf.dilation = 4 if cnf.dilation > 1 else 2
    net = MobileNetV3(setting, last_channel)
    if state is not None:
        _load(net, state, "mobilenet_v3_large")
    features = net.features
    out_pos = len(features) - 1
    body = IntermediateLayerGetter(features, return_layers={str(out_pos): "out"})
    head = DeepLabHead(features[out_pos].out_channels, num_classes, ASPP_RATES[output_stride])
    return SegmentationNet(body, head)


def _unet(backbone: str, num_classes: int, output_stride: int, state: dict | None) -> nn.Module:
    """U-Net (smp) on a ResNet, ``UNET_DEPTHS[output_stride]`` stages deep, with smp's decoder widths."""
    import segmentation_models_pytorch as smp

    depth = UNET_DEPTHS[output_stride]
    model = smp.Unet(encoder_name=backbone, encoder_weights=None, in_channels=3, classes=num_classes,
                     encoder_depth=depth, decoder_channels=(256, 128, 64, 32, 16)[5 - depth:])
    if state is not None:
        _load(model.encoder, dict(state), backbone)  # smp's ResNet encoders are torchvision ResNets
    for layer in ("layer4", "layer3")[: 5 - depth]:  # stages smp builds but a shallower U-Net never runs
        delattr(model.encoder, layer)
    return model


def _load(module: nn.Module, state: dict, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the pretrained weights do not fit a torchvision {what}: {str(err).splitlines()[0]}. "
            f"Use the file of {IMAGENET_WEIGHTS[what]}."
        ) from None


def weights_file(backbone: str) -> Path:
    """Where the torch cache keeps the ImageNet weights of ``backbone``.

    ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``, i.e. by default
    ``$TORCH_HOME/hub/checkpoints/...`` (``~/.cache/torch`` when TORCH_HOME is unset).
    """
    if backbone not in IMAGENET_WEIGHTS:
        raise ConfigError(
            f"no pretrained weights for backbone {backbone!r}; use one of {', '.join(IMAGENET_WEIGHTS)}"
        )
    name = Path(urlparse(IMAGENET_WEIGHTS[backbone].url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _imagenet_state_dict(backbone: str, weights_path: str | Path | None) -> dict[str, torch.Tensor]:
    """Read the backbone's ImageNet state dict from ``weights_path`` or the torch cache, without network."""
    weights = IMAGENET_WEIGHTS[backbone]
    path = Path(weights_path) if weights_path is not None else weights_file(backbone)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"pretrained weights for {backbone} ({weights}) were asked for but {path} does not exist. "
            f"geoseg never downloads at run time: fetch {weights.url} on a machine with network access and "
            f"place it at {path} (set TORCH_HOME to use another cache folder), pass weights_path=..., "
            "or build with pretrained=False."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{path}: not a readable weights file ({type(err).__name__}); replace it "
                              f"with {weights.url}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    log.info("loaded %s ImageNet weights from %s", backbone, path)
    return state


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The input convolution: the first ``Conv2d`` registered in the model, with its parent."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_path, _, name = path.rpartition(".")
            return model.get_submodule(parent_path), name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d")


def _replace_first_conv(
    model: nn.Module, in_channels: int, band_names: Sequence[str] | None, keep_weights: bool
) -> None:
    """Swap the 3-band input convolution for one with ``in_channels`` bands.

    With ``keep_weights`` the bands named red/green/blue (case-insensitive) keep their filters and
    every other band gets the mean of the three RGB filters; otherwise the new filters are
    initialised like torchvision's (Kaiming normal, fan-out).
    """
    parent, name, old = _first_conv(model)
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
    )
    if keep_weights:
        if band_names is None:
            band_names = RGB if in_channels == 3 else ("",) * in_channels
        names = [b.lower() for b in band_names]
        with torch.no_grad():
            rgb = old.weight  # (out, 3, kh, kw) in R, G, B order
            mean = rgb.mean(dim=1)
            for i, band in enumerate(names):
                new.weight[:, i] = rgb[:, RGB.index(band)] if band in RGB else mean
            if old.bias is not None:
                new.bias.copy_(old.bias)
        if not any(n in RGB for n in names):
            log.warning("no band is named red/green/blue; every input filter starts from the mean RGB filter")
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    setattr(parent, name, new)
