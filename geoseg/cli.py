"""The ``geoseg`` command: one level of subcommands, thin over the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from geoseg.errors import GeosegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Satellite imagery to land-cover maps.")


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="show debug logging"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="only warnings and errors"),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def info(scene: Path = typer.Argument(..., help="GeoTIFF to inspect")) -> None:
    """Validate a scene and print what geoseg sees in it."""
    from geoseg.raster import open_scene

    s = open_scene(scene)
    typer.echo(f"{s.path}: {s.width} x {s.height} px, {s.count} bands {list(s.band_names)}, {s.dtype}")
    typer.echo(f"  CRS {s.crs.to_string()}, pixel {s.transform.a:g} x {-s.transform.e:g}, nodata {s.nodata}")


def main() -> None:
    """Entry point: run the app, printing a GeosegError as one line (no traceback), exit code 2."""
    try:
        app()
    except GeosegError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
