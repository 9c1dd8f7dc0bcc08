from pathlib import Path

import pytest

from geoseg.config import KINDS, ClassSchema, ModelConfig, PredictConfig, TrainConfig, load_config
from geoseg.errors import ConfigError, GeosegError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_every_kind_has_files():
    assert {p.parent.name for p in ALL_YAML} == set(KINDS)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, KINDS[path.parent.name])


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_point_at_existing_files(path):
    cfg = load_config(path)
    root = CONFIGS.parent
    scenes = cfg.data.scenes or [cfg.data]
    for s in scenes:
        for p in (getattr(s, "image", None) or s.images, s.labels):
            assert (root / p).exists(), p
    assert (root / cfg.data.classes).exists()


def test_demo_config_reads_its_model_file_and_both_scenes():
    cfg = load_config(CONFIGS / "train" / "nc_landclass96.yaml")
    assert cfg.model == load_config(CONFIGS / "models" / "deeplabv3_mobilenetv3_64.yaml")
    assert [s.bands for s in cfg.data.scenes] == [None, (1, 2, 3, 4, 5, 6)]
    schema = load_config(CONFIGS.parent / cfg.data.classes)
    assert schema.ids == (1, 2, 3, 4, 5, 6, 7)
    assert schema.classes[0].rgb == (0xD7, 0x19, 0x1C)


def _write(tmp_path, kind, text):
    d = tmp_path / kind
    d.mkdir(exist_ok=True)
    p = d / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    p = _write(tmp_path, "models", "arch: deeplabv3\nbackbone: resnet50\ntile: 640\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "tile:" in msg and "tile_size" in msg and "output_stride" in msg


def test_wrong_value_lists_allowed_values(tmp_path):
    p = _write(tmp_path, "models", "arch: segformer\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "arch" in msg and "'deeplabv3'" in msg and "'unet'" in msg


def test_backbone_must_fit_arch(tmp_path):
    p = _write(tmp_path, "models", "arch: fcn\nbackbone: mobilenet_v3_large\n")
    with pytest.raises(ConfigError, match="resnet50"):
        load_config(p)


def test_nested_unknown_key(tmp_path):
    p = _write(
        tmp_path, "train",
        "data: {kind: tiles, images: a, labels: b, classes: c, colour: x}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "data.colour" in str(e.value) and "label_field" in str(e.value)


def test_errors_are_geoseg_and_value_errors(tmp_path):
    p = _write(tmp_path, "predict", "scales: [0]\n")
    with pytest.raises(GeosegError):
        load_config(p)
    with pytest.raises(ValueError):
        load_config(p)


def test_tile_size_multiple_of_32():
    with pytest.raises(Exception, match="multiple of 32"):
        ModelConfig(tile_size=100)


def test_class_schema_rejects_duplicates_and_bad_colours():
    with pytest.raises(Exception, match="unique"):
        ClassSchema(name="x", classes=[{"id": 1, "name": "a", "color": "#000000"},
                                       {"id": 1, "name": "b", "color": "#000000"}])
    with pytest.raises(Exception, match="#1a2b3c"):
        ClassSchema(name="x", classes=[{"id": 1, "name": "a", "color": "red"},
                                       {"id": 2, "name": "b", "color": "#000000"}])


def test_defaults_are_valid():
    assert PredictConfig().scales == (1.0,)
    assert TrainConfig.model_fields["split"].default == (0.7, 0.15, 0.15)


def test_not_yaml_mapping(tmp_path):
    p = _write(tmp_path, "predict", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
