"""The parts of vectorising (:func:`geoseg.vectorize.vectorize`), one concept per module.

* ``inputs``: class and confidence rasters (GeoTIFF/COG or a Zarr store), read block by block;
* ``regions``: a block's regions, labelled;
* ``trace``: their outlines, traced on the pixel grid (the polygons GDAL gives);
* ``polygons``: polygons as flat numpy arrays, their areas, perimeters and WKB;
* ``blocks``: one block polygonised, and the pool of worker processes;
* ``sweep``: the union-find that joins regions across block borders;
* ``borders``: pieces of regions cut by block borders, spilled and handed out when complete;
* ``merge``: pieces joined into whole polygons;
* ``sieve``: the minimum-mapping-unit sieve;
* ``attributes``: the output rows.
"""
