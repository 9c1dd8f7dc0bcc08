"""Writers for finished rasters: Cloud-Optimized GeoTIFFs (polygon files: :mod:`geoseg.vector.writer`)."""
