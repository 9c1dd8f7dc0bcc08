"""Prefect flows: thin wrappers that call the geoseg library."""
