"""bench/peer.py gives geoai geoseg's weights under smp's names: each layer lands on its counterpart.

A permuted pairing (two tensors of one shape swapped) would still load; so the test gives the batch
norms and biases random values (fresh ones are all ones and zeros, which hides a swap), runs the
layers both networks share on the same input and compares their outputs.
"""

import sys

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import ROOT

from geoseg.models import build_model

sys.path.insert(0, str(ROOT / "bench"))
from peer import NETWORKS, smp_state_dict  # noqa: E402


def _smp_twin(network: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    arch, backbone, stride = NETWORKS[network]
    torch.manual_seed(0)
    ours = build_model(arch, backbone, 3, 7, output_stride=stride).eval()
    with torch.no_grad():
        for tensor in ours.state_dict().values():
            if tensor.is_floating_point() and tensor.ndim == 1:
                tensor.uniform_(0.5, 1.5)  # positive: running variances
    twin = smp.create_model(arch, encoder_name=backbone, encoder_weights=None, in_channels=3, classes=7)
    twin.load_state_dict(smp_state_dict(ours, arch, backbone, 7))
    return ours, twin.eval()


def test_unet_twin_is_the_same_network():
    ours, twin = _smp_twin("unet_resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        out = ours(x)
        assert out.isfinite().all() and out.std() > 0.1
        torch.testing.assert_close(twin(x), out)


@pytest.mark.timeout(120)
def test_deeplabv3_twin_has_the_same_layers_where_they_are_built_alike():
    ours, twin = _smp_twin("deeplabv3_resnet50")
    x = torch.randn(1, 3, 64, 64)
    body = ours.backbone
    with torch.inference_mode():
        # the stem and the first two stages: smp and torchvision build them the same way
        a = body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x))))))
        b = twin.encoder(x)[3]
        torch.testing.assert_close(b, a)
        # the ASPP head and the classifier on the same deepest features
        features = torch.randn(1, 2048, 8, 8)
        torch.testing.assert_close(twin.segmentation_head[0](twin.decoder([features])), ours.classifier(features))
