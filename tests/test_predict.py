"""Predictor: batching, padding, multi-scale and flip averaging, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoseg.checkpoint import ModelContract
from geoseg.config import ClassSchema
from geoseg.errors import BandMismatchError, ConfigError
from geoseg.models import build_model
from geoseg.predict import Predictor, _cudnn_deterministic, pad_to_multiple, resolve_device

COLOURS = ["#000000", "#ff0000", "#00ff00", "#0000ff", "#ffff00"]


def make(arch="tiny", backbone="none", bands=3, k=4, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, backbone, bands, k).eval()
    c = ModelContract(
        arch=arch, backbone=backbone, output_stride=16, tile_size=64,
        band_names=[f"b{i}" for i in range(bands)], mean=[0.0] * bands, std=[1.0] * bands,
        classes=ClassSchema(
            name="t", classes=[{"id": i, "name": f"c{i}", "color": COLOURS[i]} for i in range(k)]
        ),
    )
    return model, c


def tiles(n=3, c=3, h=40, w=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def softmax_forward(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


# --- devices -----------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available.*Use device 'cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="unsupported device 'meta'"):
        resolve_device("meta")


def test_cudnn_settings_change_only_inside_the_context():
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    with _cudnn_deterministic():
        with _cudnn_deterministic():
            assert cudnn.deterministic and not cudnn.benchmark
        assert cudnn.deterministic and not cudnn.benchmark  # still inside the outer use
    assert (cudnn.deterministic, cudnn.benchmark) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_close_to_cpu():
    model, c = make("deeplabv3", "mobilenet_v3_large")
    x = tiles(2, h=64, w=64)
    cpu = Predictor(model, c, device="cpu").predict_proba(x)
    gpu = Predictor(model, c, device="cuda").predict_proba(x)
    assert np.abs(gpu - cpu).max() < 0.05
    np.testing.assert_array_equal(gpu, Predictor(model, c, device="cuda").predict_proba(x))


# --- plain prediction --------------------------------------------------------------------------------


def test_single_scale_equals_softmax_of_the_model():
    model, c = make()
    x = tiles(3, h=37, w=45)  # odd size: the tiny net has stride 1, so no padding
    p = Predictor(model, c, device="cpu", batch_size=3).predict_proba(x)
    assert p.shape == (3, 4, 37, 45) and p.dtype == np.float32
    np.testing.assert_allclose(p, softmax_forward(model, x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_single_scale_equals_softmax_for_deeplab_at_a_stride_multiple():
    model, c = make("deeplabv3", "mobilenet_v3_large", bands=3, k=3)
    x = tiles(2, h=64, w=64)
    p = Predictor(model, c, device="cpu", batch_size=2).predict_proba(x)
    np.testing.assert_allclose(p, softmax_forward(model, x), rtol=0, atol=1e-6)


def test_batches_give_the_same_answer_and_runs_repeat_exactly():
    model, c = make()
    x = tiles(5)
    one = Predictor(model, c, device="cpu", batch_size=1).predict_proba(x)
    three = Predictor(model, c, device="cpu", batch_size=3).predict_proba(x)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(three, Predictor(model, c, device="cpu", batch_size=3).predict_proba(x))


def test_unet_input_is_padded_to_its_stride_and_cropped_back():
    model, c = make("unet", "resnet18", bands=2, k=3)
    x = tiles(1, c=2, h=50, w=70)
    p = Predictor(model, c, device="cpu").predict_proba(x)
    assert p.shape == (1, 3, 50, 70)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the same as padding by hand to the U-Net's stride 16 (reflect, split evenly: 50 -> 64 is 7 + 7,
    # 70 -> 80 is 5 + 5)
    assert c.required_stride == 16
    xp = np.pad(x, ((0, 0), (0, 0), (7, 7), (5, 5)), mode="reflect")
    pair = np.concatenate([xp, xp])  # the predictor runs a tile alone as two (see Predictor.proba)
    np.testing.assert_allclose(p, softmax_forward(model, pair)[:1, :, 7:57, 5:75], rtol=0, atol=1e-6)


def test_pad_to_multiple():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    same, off = pad_to_multiple(x, 1)
    assert same is x and off == (0, 0)
    p, off = pad_to_multiple(x, 4)  # 3 -> 4: one row at the bottom, reflected
    assert off == (0, 0) and p.shape == (1, 1, 4, 4)
    torch.testing.assert_close(p[0, 0, 3], x[0, 0, 1])
    p, off = pad_to_multiple(x, 16)  # too small to reflect 6 rows: replicate
    assert off == (6, 6) and p.shape == (1, 1, 16, 16)
    torch.testing.assert_close(p[0, 0, :6, 6], torch.zeros(6))
    torch.testing.assert_close(p[0, 0, 6:9, 6:10], x[0, 0])


# --- test-time augmentation --------------------------------------------------------------------------


def test_flip_of_a_symmetric_input_is_symmetric():
    model, c = make()
    half = tiles(2, w=20)
    x = np.concatenate([half, half[..., ::-1]], axis=-1)  # left-right mirror image
    plain = Predictor(model, c, device="cpu").predict_proba(x)
    assert np.abs(plain - plain[..., ::-1]).max() > 1e-3  # the random net itself is not symmetric
    flipped = Predictor(model, c, flip=True, device="cpu").predict_proba(x)
    np.testing.assert_allclose(flipped, flipped[..., ::-1], rtol=0, atol=1e-6)


def test_flip_averages_the_flipped_back_prediction():
    model, c = make()
    x = tiles(2)
    got = Predictor(model, c, flip=True, device="cpu").predict_proba(x)
    want = (softmax_forward(model, x) + softmax_forward(model, x[..., ::-1].copy())[..., ::-1]) / 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_multi_scale_averages_resized_probabilities():
    model, c = make()
    x = tiles(2, h=40, w=40)
    got = Predictor(model, c, scales=(0.5, 1.0, 1.5), device="cpu").predict_proba(x)
    xt = torch.from_numpy(x)
    want = torch.zeros(2, 4, 40, 40)
    with torch.inference_mode():
        for size in (20, 40, 60):
            xs = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
            logits = F.interpolate(model(xs), size=(40, 40), mode="bilinear", align_corners=False)
            want += torch.softmax(logits, dim=1) / 3
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    assert np.abs(got - softmax_forward(model, x)).max() > 1e-3


def test_cost_factor():
    model, c = make()
    assert Predictor(model, c, device="cpu").cost_factor == 1.0
    tta = Predictor(model, c, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, device="cpu")
    assert tta.cost_factor == pytest.approx(17.375)


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_refused():
    model, c = make()
    pred = Predictor(model, c, device="cpu")
    with pytest.raises(BandMismatchError, match="tiles have 4 bands but the model expects 3"):
        pred.predict_proba(tiles(1, c=4))
    x = tiles(1)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pred.predict_proba(x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pred.predict_proba(tiles(1)[0])
    with pytest.raises(ConfigError, match="scales"):
        Predictor(model, c, scales=(0.0,), device="cpu")
    with pytest.raises(ConfigError, match="batch_size"):
        Predictor(model, c, batch_size=0, device="cpu")
    assert pred.predict_proba(np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 4, 8, 8)
