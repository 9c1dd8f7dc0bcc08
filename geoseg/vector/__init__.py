"""Vectorise: class raster → polygons, block by block, merged across block borders.

:func:`vectorize` (in ``vectorise``) runs it; the parts, one concept per module:

* ``inputs``: class and confidence rasters (GeoTIFF/COG or a Zarr store), read block by block;
* ``regions``: a block's regions, labelled;
* ``trace``: their outlines, traced on the pixel grid (the polygons GDAL gives);
* ``polygons``: polygons as flat numpy arrays, their areas, perimeters and WKB;
* ``blocks``: one block polygonised, and the blocks of a raster on a Dask cluster or a spawned pool;
* ``sweep``: the union-find that joins regions across block borders;
* ``borders``: pieces of regions cut by block borders, spilled and handed out when complete;
* ``merge``: pieces joined into whole polygons;
* ``sieve``: the minimum-mapping-unit sieve;
* ``attributes``: the output rows;
* ``writer``: streaming GeoPackage, Shapefile and GeoParquet writers;
* ``vectorise``: the stage itself, :func:`vectorize`.

Nothing here imports torch or Dask, so spawned pool processes start light.
"""

from geoseg.vector.vectorise import VectorizeSummary, vectorize

__all__ = ["VectorizeSummary", "vectorize"]
