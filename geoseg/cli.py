"""The ``geoseg`` command: one level of subcommands, thin over the library."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Satellite imagery to land-cover maps.")


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="show debug logging"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="only warnings and errors"),
) -> None:
    from geoseg.command import setup_logging

    setup_logging(verbose=verbose, quiet=quiet)


class _Bar:
    """A tqdm bar driven by ``(done, total)`` progress callbacks."""

    def __init__(self, unit: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit=unit, desc=f"{unit}s", disable=None)

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


@app.command()
def info(scene: str = typer.Argument(..., help="GeoTIFF to inspect: a path or an s3://, gs://, az://, https:// URL"),
         ) -> None:
    """Validate a scene and print what geoseg sees in it."""
    from geoseg.location import redact
    from geoseg.raster import open_scene

    s = open_scene(scene)
    typer.echo(f"{redact(str(s.path))}: {s.width} x {s.height} px, {s.count} bands {list(s.band_names)}, {s.dtype}")
    typer.echo(f"  CRS {s.crs.to_string()}, pixel {s.transform.a:g} x {-s.transform.e:g}, nodata {s.nodata}")


def _parse_bands(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    bands = tuple(b.strip() for b in text.split(",") if b.strip())
    if not bands:
        raise typer.BadParameter(f"expected band indexes or names like 1,2,3 or red,green,blue, got {text!r}")
    return bands


def _parse_scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers like 0.75,1,1.25, got {text!r}") from None


@app.command()
def predict(
    scene: str = typer.Argument(..., help="input GeoTIFF: a path or an s3://, gs://, az://, https:// URL"),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="geoseg checkpoint (.pt): a path or a URL"),
    out: str = typer.Option(..., "--out", "-o", help="output folder: a path or an s3://, gs://, az:// prefix"),
    config: Path | None = typer.Option(None, "--config", help="predict settings YAML (configs/predict/)"),
    bands: str | None = typer.Option(
        None, "--bands", help="scene bands in the model's order: 1-based indexes or names, e.g. 1,2,3,4,5,6"
    ),
    tile: int | None = typer.Option(None, "--tile", help="tile size in px (default: the checkpoint's)"),
    margin: int | None = typer.Option(
        None, "--margin", help="context margin in px: tiles overlap by twice this (default: from the model)"
    ),
    scales: str | None = typer.Option(None, "--scales", help="multi-scale factors, e.g. 0.75,1,1.25"),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help="average with left-right flipped tiles"),
    block_size: int | None = typer.Option(None, "--block-size", help="block core side in px"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="tiles per forward pass"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads per worker"),
    workers: int | None = typer.Option(None, "--workers", help="local Dask worker processes"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="existing Dask scheduler, tcp://host:8786"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda"),
    vectorize: bool | None = typer.Option(None, "--vectorize/--no-vectorize", help="also write polygons"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace outputs of another run in --out"),
) -> None:
    """Classify a scene: class map and confidence COGs, polygons, Zarr store and summary in --out."""
    from geoseg.config import PredictConfig, settings_with_overrides
    from geoseg.pipeline import predict_raster

    cfg = settings_with_overrides(
        PredictConfig, config, tile_size=tile, margin=margin, scales=_parse_scales(scales), flip=flip,
        bands=_parse_bands(bands), block_size=block_size, batch_size=batch_size, threads=threads, workers=workers,
        scheduler=scheduler, device=device, vectorize=vectorize,
    )
    progress = _Bar("block")
    try:  # the cluster (none for --workers 1) starts once every input is checked
        result = predict_raster(
            scene, checkpoint, out, config=cfg, start_cluster=True, overwrite=overwrite, progress=progress
        )
    finally:
        progress.close()
    typer.echo(f"{result.blocks_computed} blocks computed, {result.blocks_skipped} resumed; outputs:")
    for name, path in result.outputs.items():
        typer.echo(f"  {name:11s} {path}")


@app.command()
def evaluate(
    scene: Path = typer.Argument(..., help="scene GeoTIFF"),
    labels: Path = typer.Argument(..., help="label raster (class ids) or vector labels (.gpkg, .shp, .geojson)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="geoseg checkpoint (.pt)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="folder for the prediction, scores and PNGs"),
    config: Path | None = typer.Option(None, "--config", help="predict settings YAML (configs/predict/)"),
    scales: str | None = typer.Option(None, "--scales", help="multi-scale factors, e.g. 0.75,1,1.25"),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help="average with left-right flipped tiles"),
    bands: str | None = typer.Option(None, "--bands", help="scene bands in the model's order, e.g. 1,2,3,4,5,6"),
    label_field: str = typer.Option("id", "--label-field", help="class field of vector labels"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier evaluation in --out"),
) -> None:
    """Score a model on a scene against labels: confusion matrix, IoU and F1 per class, mIoU, accuracy."""
    from geoseg.config import PredictConfig, settings_with_overrides
    from geoseg.train.evaluate import evaluate as run

    cfg = settings_with_overrides(PredictConfig, config, scales=_parse_scales(scales), flip=flip,
                                  bands=_parse_bands(bands), workers=1)
    result = run(scene, labels, checkpoint, out_dir=out, config=cfg, label_field=label_field, overwrite=overwrite)
    m = result.metrics
    typer.echo(f"macro mIoU {_fmt(m['miou_macro'])}, pixel accuracy {_fmt(m['pixel_accuracy'])} "
               f"over {m['labelled_pixels']} labelled pixels ({m['labelled_without_data']} without scene data)")
    for name in m["classes"]:
        typer.echo(f"  {name:14s} IoU {_fmt(m['iou_by_class'][name])}  F1 {_fmt(m['f1_by_class'][name])}")
    for name, path in result.files.items():
        typer.echo(f"  {name:11s} {path}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command()
def vectorize(
    class_map: Path = typer.Argument(..., help="class raster: a GeoTIFF/COG or the prediction.zarr store"),
    out: Path = typer.Option(..., "--out", "-o", help="polygons file: .gpkg, .shp or .parquet"),
    classes: Path | None = typer.Option(None, "--classes", help="class schema YAML for class names"),
    min_area: float | None = typer.Option(None, "--min-area", help="minimum mapping unit in m²"),
    simplify: float | None = typer.Option(None, "--simplify", help="simplification tolerance in metres"),
    confidence: Path | None = typer.Option(None, "--confidence", help="confidence raster for mean_conf"),
    block_size: int = typer.Option(2048, "--block-size", help="block side in px (memory, not the result)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
) -> None:
    """Polygons from a class raster, merged across block borders (exact without --min-area/--simplify)."""
    from geoseg.config import ClassSchema, load_config
    from geoseg.vector import vectorize as run

    schema = load_config(classes, ClassSchema) if classes else None
    bar = _Bar("block")
    try:
        summary = run(class_map, out, classes=schema, block_size=block_size, min_area=min_area, simplify=simplify,
                      confidence=confidence, overwrite=overwrite, progress=bar)
    finally:
        bar.close()
    typer.echo(f"{summary.polygons} polygons written to {out}")


@app.command()
def train(
    config: Path = typer.Option(..., "--config", help="training settings YAML (configs/train/)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="run folder (default: the config's out_dir)"),
    epochs: int | None = typer.Option(None, "--epochs", help="override the number of epochs"),
    resume: bool = typer.Option(False, "--resume", help="continue from last.pt in the run folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
) -> None:
    """Train one model; writes best.pt / last.pt with the full contract, split.json and metrics.json."""
    from tqdm import tqdm

    from geoseg.config import TrainConfig, settings_with_overrides
    from geoseg.train import train as run

    cfg = settings_with_overrides(TrainConfig, config, epochs=epochs)
    with tqdm(total=cfg.epochs, unit="epoch", disable=None) as bar:

        def progress(row: dict) -> None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_miou=f"{row['val_miou'] or 0:.3f}")
            bar.update(1)

        result = run(cfg, out_dir=out, progress=progress, resume=resume, overwrite=overwrite)
    test = result.test or {}
    typer.echo(f"best checkpoint {result.best}; test macro mIoU {test.get('miou_macro')}, "
               f"pixel accuracy {test.get('pixel_accuracy')} (metrics in {result.metrics_file})")


@app.command()
def compare(
    config: Path = typer.Option(..., "--config", help="training settings YAML with a `compare` list"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder"),
) -> None:
    """Train DeepLabV3, FCN and U-Net on one split; write a table and a side-by-side PNG."""
    from geoseg.config import TrainConfig, load_config
    from geoseg.train.compare import compare as run

    result = run(load_config(config, TrainConfig), out_dir=out,
                 progress=lambda name, row: typer.echo(f"{name}: epoch {row.get('epoch')}", err=True))
    typer.echo(result.table_md.read_text())
    typer.echo(f"table {result.table_csv}, figure {result.figure}")


def main() -> None:
    """Entry point: a GeosegError prints one line (exit 2), an interrupt one line (exit 130 / 143)."""
    from geoseg.command import run_command

    sys.exit(run_command(app))
