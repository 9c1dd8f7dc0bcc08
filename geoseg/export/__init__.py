"""Writers for finished outputs: Cloud-Optimized GeoTIFFs and polygon files."""
