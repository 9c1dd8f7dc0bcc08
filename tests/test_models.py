"""Model building, pretrained weights from the local cache, checkpoints with their contract."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from geoseg.checkpoint import (
    ModelContract,
    check_scene,
    contract_for,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from geoseg.config import BACKBONES, ClassSchema, ModelConfig
from geoseg.errors import BandMismatchError, CheckpointError, ConfigError, GeosegError, WeightsNotFoundError
from geoseg.models import (
    IMAGENET_WEIGHTS,
    SegmentationNet,
    build_model,
    receptive_field,
    required_stride,
    weights_file,
)
from geoseg.raster import open_scene

COLOURS = ["#000000", "#ff0000", "#00ff00", "#0000ff", "#ffff00", "#00ffff", "#ff00ff", "#ffffff"]


def schema(k: int) -> ClassSchema:
    classes = [{"id": i + 1, "name": f"c{i}", "color": COLOURS[i]} for i in range(k)]
    return ClassSchema(name="test", classes=classes)


def contract(arch="tiny", backbone="none", bands=("red", "green", "blue"), k=3, **kw) -> ModelContract:
    n = len(bands)
    return ModelContract(
        arch=arch, backbone=backbone, output_stride=kw.pop("output_stride", 16), tile_size=64,
        band_names=bands,
        mean=kw.pop("mean", [0.1 * i for i in range(n)]), std=kw.pop("std", [1.0 + i for i in range(n)]),
        classes=schema(k), **kw,
    )


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


BIG = {"resnet101"}
COMBOS = [
    pytest.param(arch, bb, marks=[pytest.mark.slow] if bb in BIG else [], id=f"{arch}-{bb}")
    for arch, bbs in BACKBONES.items()
    for bb in bbs
]


# --- building ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,backbone", COMBOS)
@pytest.mark.parametrize("bands", [3, 13])
def test_every_model_builds_and_keeps_the_tile_size(arch, backbone, bands):
    torch.manual_seed(0)
    model = build_model(arch, backbone, bands, 5).eval()
    assert first_conv(model).in_channels == bands
    with torch.inference_mode():
        y = model(torch.randn(1, bands, 64, 64))
    assert isinstance(y, torch.Tensor)  # plain logits, not torchvision's dict
    assert tuple(y.shape) == (1, 5, 64, 64)
    assert torch.isfinite(y).all()
    assert not any("aux" in name for name, _ in model.named_modules())


def test_wrong_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="deeplabv3, fcn, unet, tiny"):
        build_model("pspnet", "resnet50", 3, 2)
    with pytest.raises(ConfigError, match="resnet50, resnet101, mobilenet_v3_large") as err:
        build_model("deeplabv3", "resnet18", 3, 2)
    assert isinstance(err.value, ValueError) and isinstance(err.value, GeosegError)
    with pytest.raises(ConfigError, match="output_stride must be 8 or 16"):
        build_model("deeplabv3", "resnet50", 3, 2, output_stride=32)


def _aspp_rates(model: SegmentationNet) -> list[int]:
    aspp = model.classifier[0]
    return [branch[0].dilation[0] for branch in list(aspp.convs)[1:4]]


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v3_large"])
def test_output_stride_sets_dilation_and_aspp_rates(backbone):
    x = torch.randn(1, 3, 64, 64)
    for os_, rates in [(16, [6, 12, 18]), (8, [12, 24, 36])]:
        model = build_model("deeplabv3", backbone, 3, 4, output_stride=os_).eval()
        assert _aspp_rates(model) == rates
        with torch.inference_mode():
            feats = model.backbone(x)["out"]
        assert feats.shape[-2:] == (64 // os_, 64 // os_)
    r16 = build_model("deeplabv3", "resnet50", 3, 2, output_stride=16)
    r8 = build_model("deeplabv3", "resnet50", 3, 2, output_stride=8)
    assert r16.backbone.layer3[1].conv2.dilation == (1, 1) and r16.backbone.layer4[1].conv2.dilation == (2, 2)
    assert r8.backbone.layer3[1].conv2.dilation == (2, 2) and r8.backbone.layer4[1].conv2.dilation == (4, 4)


def test_fcn_follows_the_output_stride_too():
    x = torch.randn(1, 3, 64, 64)
    for os_ in (8, 16):
        model = build_model("fcn", "resnet50", 3, 2, output_stride=os_).eval()
        with torch.inference_mode():
            assert model.backbone(x)["out"].shape[-1] == 64 // os_


def test_tiny_receptive_field_is_measured_15():
    torch.manual_seed(0)
    model = build_model("tiny", "none", 2, 3)
    for p in model.parameters():  # positive weights: every path contributes, so the footprint is exact
        p.data = p.data.abs() + 0.01
    x = torch.zeros(1, 2, 41, 41, requires_grad=True)
    model(x)[0, 0, 20, 20].backward()
    rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
    assert rows.max() - rows.min() + 1 == 15 == cols.max() - cols.min() + 1
    assert receptive_field("tiny") == 15
    assert all(receptive_field(a) is None for a in ("deeplabv3", "fcn", "unet"))
    assert [required_stride(a) for a in ("tiny", "unet", "deeplabv3", "fcn")] == [1, 32, 32, 32]
    with pytest.raises(ConfigError):
        receptive_field("segformer")


# --- pretrained weights from the local torch cache -----------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # honour TORCH_HOME even if set_dir was called
    return tmp_path / "torch"


def _write_weights(path, net: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    for p in net.parameters():
        p.data.normal_()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_unet_pretrained_loads_the_cached_resnet_and_maps_rgb_bands(torch_home):
    path = weights_file("resnet18")
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    state = _write_weights(path, torchvision.models.resnet18(weights=None))

    rgb = build_model("unet", "resnet18", 3, 4, output_stride=32, pretrained=True)
    enc = rgb.encoder.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(enc[k], v, rtol=0, atol=0)

    four = build_model("unet", "resnet18", 4, 4, output_stride=32, pretrained=True,
                       band_names=["nir", "Blue", "red", "green"])
    w, w0 = four.encoder.conv1.weight, state["conv1.weight"]
    torch.testing.assert_close(w[:, 1], w0[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(w[:, 2], w0[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(w[:, 3], w0[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(w[:, 0], w0.mean(dim=1), rtol=0, atol=0)
    deep = four.encoder.layer4[1].conv2.weight
    torch.testing.assert_close(deep, state["layer4.1.conv2.weight"], rtol=0, atol=0)


def test_unet_output_stride_sets_its_depth_and_drops_the_stages_it_never_runs(torch_home):
    state = _write_weights(weights_file("resnet18"), torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 4, 64, 96)
    sizes = {}
    for os_, gone in [(32, ()), (16, ("layer4",)), (8, ("layer4", "layer3"))]:
        model = build_model("unet", "resnet18", 4, 3, output_stride=os_, pretrained=True).eval()
        enc = model.encoder
        assert [hasattr(enc, name) for name in ("layer3", "layer4")] == [n not in gone for n in ("layer3", "layer4")]
        torch.testing.assert_close(enc.layer2[1].conv2.weight, state["layer2.1.conv2.weight"], rtol=0, atol=0)
        with torch.inference_mode():
            feats = enc(x)
            assert model(x).shape[-2:] == (64, 96)
        assert feats[-1].shape[-2:] == (64 // os_, 96 // os_)
        assert required_stride("unet", os_) == os_
        sizes[os_] = sum(p.numel() for p in model.parameters())
    assert sizes[8] < sizes[16] < 0.4 * sizes[32]  # resnet18's layer4 holds most of its weights
    with pytest.raises(ConfigError, match="8, 16 or 32"):
        build_model("unet", "resnet18", 4, 3, output_stride=4)


def test_deeplab_mobilenet_pretrained_from_an_explicit_file(tmp_path):
    path = tmp_path / "my_mobilenet.pth"
    state = _write_weights(path, torchvision.models.mobilenet_v3_large(weights=None))
    model = build_model("deeplabv3", "mobilenet_v3_large", 3, 2, pretrained=True, weights_path=path)
    got = model.backbone.state_dict()
    loaded = 0
    for k, v in state.items():
        if k.startswith("features."):
            torch.testing.assert_close(got[k.removeprefix("features.")], v, rtol=0, atol=0)
            loaded += 1
    assert loaded == len(got)


def test_missing_weights_name_the_file_and_never_fall_back_to_random(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        build_model("deeplabv3", "resnet50", 3, 2, pretrained=True)
    msg = str(err.value)
    assert str(expected) in msg and IMAGENET_WEIGHTS["resnet50"].url in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        build_model("fcn", "resnet101", 3, 2, pretrained=True, weights_path=torch_home / "nowhere.pth")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model("tiny", "none", 3, 2, pretrained=True)


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    _write_weights(path, torchvision.models.resnet34(weights=None))
    with pytest.raises(CheckpointError, match="do not fit a torchvision resnet18"):
        build_model("unet", "resnet18", 3, 2, pretrained=True, weights_path=path)


# --- contract ----------------------------------------------------------------------------------------


def test_contract_normalises_and_round_trips_through_json():
    c = contract(bands=("b1", "b2"), mean=[10.0, 20.0], std=[2.0, 4.0], scale=0.5, provenance={"epochs": 3})
    data = np.array([[[20.0, 40.0]], [[40.0, 80.0]]], np.float32)
    out = c.normalise(data, np.array([[True, False]]))
    np.testing.assert_array_equal(out, np.zeros((2, 1, 2)))  # valid pixel -> 0 by value, invalid -> 0
    out = c.normalise(data, np.array([[True, True]]))
    np.testing.assert_allclose(out, [[[0.0, 5.0]], [[0.0, 5.0]]])
    assert out.dtype == np.float32
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelContract.from_dict(d) == c
    assert (c.in_channels, c.num_classes, c.receptive_field, c.required_stride) == (2, 3, 15, 1)


def test_contract_refuses_inconsistent_values():
    with pytest.raises(ConfigError, match="one mean and one std per band"):
        contract(bands=("a", "b"), mean=[0.0], std=[1.0, 1.0])
    with pytest.raises(ConfigError, match="std must be"):
        contract(bands=("a",), mean=[0.0], std=[0.0])
    with pytest.raises(ConfigError, match="JSON"):
        contract(provenance={"when": object()})
    with pytest.raises(ConfigError, match="unknown arch/backbone"):
        contract(arch="unet", backbone="none")
    with pytest.raises(ConfigError, match="lacks mean, std"):
        ModelContract.from_dict({k: v for k, v in contract().to_dict().items() if k not in ("mean", "std")})


def test_contract_for_a_model_config():
    cfg = ModelConfig(arch="unet", backbone="resnet34", tile_size=320)
    c = contract_for(cfg, band_names=["r", "g"], mean=[0, 0], std=[1, 1], classes=schema(2), scale=1 / 255)
    got = (c.arch, c.backbone, c.tile_size, c.receptive_field, c.scale)
    assert got == ("unet", "resnet34", 320, None, 1 / 255)


# --- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("arch,backbone", [("tiny", "none"), ("deeplabv3", "mobilenet_v3_large")])
def test_checkpoint_round_trip(tmp_path, arch, backbone, half):
    torch.manual_seed(0)
    bands = ("red", "green", "blue", "nir")
    c = contract(arch, backbone, bands=bands, k=4, provenance={"data": "x", "miou": 0.5})
    model = build_model(arch, backbone, 4, 4).eval()
    with torch.no_grad():  # non-trivial BN statistics so buffers are checked as well
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, c, half=half)
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temporary file left behind

    loaded, c2 = load_checkpoint(path)
    assert c2 == c and not loaded.training
    before = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == before[k].dtype
        want = before[k].half().float() if half and v.is_floating_point() else before[k]
        torch.testing.assert_close(v, want, rtol=0, atol=0)
    x = torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        y0, y1 = model(x), loaded(x)
    if half:
        torch.testing.assert_close(y1, y0, rtol=0.05, atol=0.05)
    else:
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def test_half_checkpoint_is_smaller(tmp_path):
    model = build_model("deeplabv3", "mobilenet_v3_large", 3, 2)
    c = contract("deeplabv3", "mobilenet_v3_large", k=2)
    full = save_checkpoint(tmp_path / "full.pt", model, c)
    half = save_checkpoint(tmp_path / "half.pt", model, c, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size


class _Payload:
    """Unpickling this would create a marker file: the refusal must not run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    whole = tmp_path / "whole_module.pt"
    torch.save(build_model("tiny", "none", 3, 2), whole)
    with pytest.raises(CheckpointError, match="holds pickled code") as err:
        load_checkpoint(whole)
    assert str(whole) in str(err.value) and "will not be unpickled" in str(err.value)
    assert "save_checkpoint" in str(err.value)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "geoseg-checkpoint", "version": 1, "contract": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file") as err:
        load_checkpoint(tmp_path / "missing.pt")
    assert "missing.pt" in str(err.value)

    bare = tmp_path / "bare.pt"
    torch.save(build_model("tiny", "none", 3, 2).state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare.pt: not a geoseg checkpoint.*bare state dict"):
        load_checkpoint(bare)

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a"):
        load_checkpoint(text)

    good = save_checkpoint(tmp_path / "good.pt", build_model("tiny", "none", 3, 2), contract(k=2))
    obj = torch.load(good, weights_only=True)

    del obj["contract"]["band_names"]
    torch.save(obj, tmp_path / "nobands.pt")
    with pytest.raises(CheckpointError, match="nobands.pt: bad contract: contract lacks band_names"):
        load_checkpoint(tmp_path / "nobands.pt")

    obj = torch.load(good, weights_only=True)
    obj["contract"]["classes"] = schema(5).model_dump(mode="json")  # 5 classes, weights for 2
    torch.save(obj, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not fit tiny/none with 3 bands and 5"):
        load_checkpoint(tmp_path / "mismatch.pt")

    obj = torch.load(good, weights_only=True)
    obj["version"] = 99
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="upgrade geoseg"):
        load_checkpoint(tmp_path / "future.pt")


def test_save_replaces_atomically_and_hash_is_stable(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("tiny", "none", 3, 2), contract(k=2))
    first = file_sha256(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.manual_seed(1)
    save_checkpoint(path, build_model("tiny", "none", 3, 2), contract(k=2))
    assert file_sha256(path) != first and os.listdir(tmp_path) == ["m.pt"]


# --- scenes ------------------------------------------------------------------------------------------


def test_check_scene_matches_bands_by_name_and_refuses_mismatches(rgb_uint8, utm_uint16):
    scene = open_scene(rgb_uint8)  # bands named red, green, blue
    assert check_scene(contract(bands=("red", "green", "blue")), scene) == (1, 2, 3)
    assert check_scene(contract(bands=("blue", "green", "red")), scene) == (3, 2, 1)
    with pytest.raises(BandMismatchError, match="do not match the model's"):
        check_scene(contract(bands=("nir", "red", "green")), scene)
    with pytest.raises(BandMismatchError, match="has 3 data bands but the model expects 4"):
        check_scene(contract(bands=("red", "green", "blue", "nir")), scene)
    unnamed = open_scene(utm_uint16)  # 4 unnamed bands: matched by count
    assert check_scene(contract(bands=("b", "g", "r", "nir")), unnamed) == (1, 2, 3, 4)
    with pytest.raises(BandMismatchError, match="has 4 data bands but the model expects 3"):
        check_scene(contract(), unnamed)
