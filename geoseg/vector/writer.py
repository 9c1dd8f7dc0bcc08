"""Streaming polygon writers: GeoPackage (default), ESRI Shapefile and GeoParquet.

Polygons go out batch by batch (GeoPackage and Shapefile: one ``pyogrio.write_arrow`` call, fed an
Arrow stream from a bounded queue, in a writer thread; GeoParquet: a ``pyarrow.parquet.ParquetWriter``),
so memory follows the batch size, never the number of polygons. The file is written under a
temporary name in the output folder and renamed when it is complete (every sidecar of a Shapefile
too); a failed or interrupted write leaves nothing that looks like a result::

    with VectorWriter("landcover.gpkg", crs=scene.crs) as w:
        for batch in batches:      # GeoDataFrame, or pyarrow Table with a WKB "geometry" column
            w.write(batch)
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from geoseg.atomic import atomic_write
from geoseg.errors import VectorExportError

if TYPE_CHECKING:
    import geopandas as gpd

log = logging.getLogger(__name__)

#: Output formats by file suffix; a path without one gets a GeoPackage (or the driver's suffix).
DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile", ".parquet": "Parquet", ".geoparquet": "Parquet"}
_SUFFIX = {"GPKG": ".gpkg", "ESRI Shapefile": ".shp", "Parquet": ".parquet"}
#: Largest .shp or .dbf GDAL writes by default (2 GB).
SHAPEFILE_MAX_BYTES = 2 * 1024**3
#: Shapefile (dBASE) field names hold at most 10 characters; longer names are cut (geoseg's own fit).
SHAPEFILE_NAME_CHARS = 10
_SHAPEFILE_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")
#: dBASE field widths GDAL uses by default, to estimate .dbf size before the first batch.
_DBF_WIDTH = {
    "int8": 4,
    "int16": 6,
    "int32": 11,
    "int64": 20,
    "float": 24,
    "double": 24,
    "string": 80,
    "large_string": 80,
    "bool": 1,
}
GEOMETRY = "geometry"
_END, _ABORT = object(), object()


class _Aborted(Exception):
    """Raised inside the Arrow stream to stop GDAL when the writer is aborted."""


def infer_driver(path: str | Path, driver: str | None = None) -> str:
    """The output format for ``path``: ``driver`` if given, else from the suffix (``.gpkg`` by default).

    Raises:
        VectorExportError: the suffix or driver is not one geoseg writes.
    """
    path = Path(path)
    known = sorted(set(DRIVERS.values()))
    if driver is not None:
        if driver not in known:
            raise VectorExportError(f"{path}: unknown vector format {driver!r}; use one of {known}.")
        return driver
    suffix = path.suffix.lower()
    if not suffix:
        return "GPKG"
    if suffix not in DRIVERS:
        raise VectorExportError(
            f"{path}: cannot tell the vector format from the suffix {suffix!r}. "
            "Use .gpkg (GeoPackage), .shp (Shapefile) or .parquet (GeoParquet)."
        )
    return DRIVERS[suffix]


class VectorWriter:
    """Write polygons in batches to a GeoPackage, Shapefile or GeoParquet file, atomically.

    Args:
        path: the output file; the format comes from its suffix (see :func:`infer_driver`).
        crs: the polygons' CRS (anything :class:`pyproj.CRS` accepts, e.g. a rasterio CRS).
        fields: attribute names and Arrow types (``"int32"``, ``"string"``, ``"float64"`` or a
            ``pyarrow.DataType``), in output order; by default taken from the first batch. Needed to
            give an empty output its fields.
        driver: ``"GPKG"``, ``"ESRI Shapefile"`` or ``"Parquet"`` to override the suffix.
        overwrite: replace an existing output (only once the new one is complete).
        geometry_type: the geometry type recorded in the file.
        layer: layer name (GeoPackage); defaults to the file's stem.
        max_shapefile_bytes: refuse a Shapefile whose .shp or .dbf would grow past this.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        VectorExportError: unknown format.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        crs: Any,
        fields: Mapping[str, str | pa.DataType] | None = None,
        driver: str | None = None,
        overwrite: bool = False,
        geometry_type: str = "Polygon",
        layer: str | None = None,
        max_shapefile_bytes: int = SHAPEFILE_MAX_BYTES,
    ) -> None:
        self.path = Path(path)
        self.driver = infer_driver(self.path, driver)
        if not self.path.suffix:
            self.path = self.path.with_suffix(_SUFFIX[self.driver])
        if self.path.is_dir():
            raise VectorExportError(
                f"{self.path}: is a folder; give a file name, e.g. {self.path / 'a.gpkg'}."
            )
        try:
            self.crs = CRS.from_user_input(crs)
        except Exception as err:  # noqa: BLE001  (pyproj raises CRSError, TypeError, ...)
            raise VectorExportError(f"{self.path}: cannot use {crs!r} as a CRS ({err}).") from None
        self.geometry_type = geometry_type
        self.layer = layer or self.path.stem
        self.max_shapefile_bytes = max_shapefile_bytes
        self.features = 0
        self._schema = None if fields is None else _schema(fields)
        self._parquet: pq.ParquetWriter | None = None
        self._started = False
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._shp_bytes = self._dbf_bytes = 100
        self._atomic = atomic_write(self.path, overwrite=overwrite, sidecars=self._sidecars)
        self._tmp = self._atomic.__enter__()

    def __enter__(self) -> VectorWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing ------------------------------------------------------------------------------

    def write(self, batch: gpd.GeoDataFrame | pa.Table) -> None:
        """Append a batch of polygons (a GeoDataFrame, or an Arrow table with WKB ``geometry``).

        Raises:
            VectorExportError: the batch does not fit the fields, a Shapefile would pass 2 GB, or
                writing failed.
        """
        if self._closed:
            raise VectorExportError(f"{self.path}: the writer is already closed.")
        table = self._conform(_to_table(batch))
        if self.driver == "ESRI Shapefile":
            table = table.rename_columns(_shapefile_names(table.column_names, self.path))
            self._check_shapefile_size(table)
        if self.driver == "Parquet":
            try:
                self._write_parquet(table)
            except OSError as err:
                raise VectorExportError(f"{self.path}: writing failed ({err}).") from err
        else:
            self._send(table)
        self.features += len(table)

    def _conform(self, table: pa.Table) -> pa.Table:
        if GEOMETRY not in table.column_names:
            raise VectorExportError(f"{self.path}: batch has no {GEOMETRY!r} column (WKB polygons).")
        if self._schema is None:
            attrs = [f for f in table.schema if f.name != GEOMETRY]
            self._schema = pa.schema([*attrs, pa.field(GEOMETRY, pa.binary())])
        names = self._schema.names
        missing = sorted(set(names) - set(table.column_names))
        if missing:
            raise VectorExportError(f"{self.path}: batch lacks the fields {missing}; expected {names}.")
        try:
            return table.select(names).cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise VectorExportError(
                f"{self.path}: batch does not match the fields {self._schema}: {err}"
            ) from err

    def _write_parquet(self, table: pa.Table) -> None:
        if self._parquet is None:
            geo = {
                "version": "1.1.0",
                "primary_column": GEOMETRY,
                "columns": {
                    GEOMETRY: {
                        "encoding": "WKB",
                        "geometry_types": [self.geometry_type],
                        "crs": self.crs.to_json_dict(),
                    }
                },
            }
            schema = self._schema.with_metadata({"geo": json.dumps(geo)})
            # no statistics or dictionary for the geometry: a min/max of WKB is useless, and for a
            # polygon of millions of vertices it costs copies of it
            attrs = [n for n in schema.names if n != GEOMETRY]
            self._parquet = pq.ParquetWriter(
                self._tmp, schema, compression="zstd", use_dictionary=attrs, write_statistics=attrs
            )
        self._parquet.write_table(table.replace_schema_metadata(self._parquet.schema.metadata))

    def _send(self, table: pa.Table | object) -> None:
        """Queue a table (or an end marker) for the OGR writer thread, starting it on first use.

        GDAL gets the whole output as one Arrow stream in one call, so the layer is created once and
        its spatial index built once at the end (appending batch by batch reopens the file and
        updates the index row by row, several times slower).
        """
        if self._thread is None:
            schema = self._schema
            if self.driver == "ESRI Shapefile":
                schema = pa.schema(
                    [
                        f.with_name(n)
                        for f, n in zip(schema, _shapefile_names(schema.names, self.path), strict=True)
                    ]
                )
            reader = pa.RecordBatchReader.from_batches(schema, self._stream())
            self._thread = threading.Thread(target=self._run_ogr, args=(reader,), daemon=True)
            self._thread.start()
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(table, timeout=0.1)
                return
            except queue.Full:
                continue

    def _stream(self) -> Iterator[pa.RecordBatch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield from item.to_batches()

    def _run_ogr(self, reader: pa.RecordBatchReader) -> None:
        import pyogrio  # imports geopandas: only when a GeoPackage or Shapefile is written

        shapefile = self.driver == "ESRI Shapefile"
        try:
            pyogrio.write_arrow(
                reader,
                self._tmp,
                layer=self._tmp.stem if shapefile else self.layer,
                driver=self.driver,
                geometry_name=GEOMETRY,
                geometry_type=self.geometry_type,
                crs=self.crs.to_wkt(),
                layer_options={"SPATIAL_INDEX": "YES"} if shapefile else None,  # the .qix QGIS reads
            )
        except BaseException as err:  # noqa: BLE001  (handed to the caller's thread)
            self._error = err

    def _raise_if_failed(self, *, finished: bool = False) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise VectorExportError(
                f"{self.path}: writing failed ({self._error}). Check free space and permissions."
            ) from self._error
        if not finished and self._thread is not None and not self._thread.is_alive():
            raise VectorExportError(f"{self.path}: the writer stopped early.")

    def _check_shapefile_size(self, table: pa.Table) -> None:
        n = len(table)
        wkb = pc.sum(pc.binary_length(table[GEOMETRY])).as_py() or 0
        record = 1 + sum(_DBF_WIDTH.get(str(f.type), 24) for f in table.schema if f.name != GEOMETRY)
        shp_next = self._shp_bytes + wkb + 52 * n
        dbf_next = (
            self._dbf_bytes + (33 + 32 * (table.num_columns - 1) if not self.features else 0) + record * n
        )
        if max(shp_next, dbf_next) > self.max_shapefile_bytes:
            part = ".shp" if shp_next >= dbf_next else ".dbf"
            raise VectorExportError(
                f"{self.path}: the Shapefile's {part} would pass {self.max_shapefile_bytes / 1024**3:.3g} GB "
                f"(the format's limit) after {self.features + n} polygons. "
                "Write a GeoPackage (.gpkg) or GeoParquet (.parquet) instead."
            )
        self._shp_bytes, self._dbf_bytes = shp_next, dbf_next

    # -- finishing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the file and move it to its final name (an empty layer if nothing was written)."""
        if self._closed:
            return
        try:
            if self._schema is None:
                self._schema = pa.schema([pa.field(GEOMETRY, pa.binary())])
            if self.driver == "Parquet":
                if self._parquet is None:
                    self._write_parquet(self._schema.empty_table())
                self._parquet.close()
                self._parquet = None
            else:
                self._send(_END)
                self._thread.join()
                self._raise_if_failed(finished=True)
            self._atomic.__exit__(None, None, None)  # renames the file (and its sidecars) into place
        except BaseException:
            self.abort()
            raise
        self._closed = True
        log.debug("wrote %d polygons to %s", self.features, self.path)

    def abort(self) -> None:
        """Stop writing and drop the temporary file(s); the final path is left as it was."""
        if self._parquet is not None:
            try:
                self._parquet.close()
            except Exception:  # noqa: BLE001  (the file is deleted anyway)
                pass
            self._parquet = None
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.put(_ABORT, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        if not self._closed:
            self._atomic.__exit__(_Aborted, _Aborted(), None)  # drops the temporary file and sidecars
        self._closed = True

    def _sidecars(self, path: Path) -> list[Path]:
        """The files that travel with ``path``: a Shapefile's parts, a GeoPackage's SQLite journals.

        A sidecar the new file lacks (an old Shapefile's ``.qix``) is removed from the final name.
        """
        if self.driver == "ESRI Shapefile":
            return [path.with_suffix(ext) for ext in _SHAPEFILE_SIDECARS] + [Path(f"{path}.xml")]
        return [Path(f"{path}{x}") for x in ("-journal", "-wal", "-shm")]


def _schema(fields: Mapping[str, str | pa.DataType]) -> pa.Schema:
    out = []
    for name, kind in fields.items():
        try:
            out.append(pa.field(name, pa.type_for_alias(kind) if isinstance(kind, str) else kind))
        except ValueError as err:
            raise VectorExportError(f"field {name!r}: unknown type {kind!r} ({err})") from None
    return pa.schema([*out, pa.field(GEOMETRY, pa.binary())])


def _to_table(batch: gpd.GeoDataFrame | pa.Table) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "geometry") and hasattr(batch, "drop"):  # a GeoDataFrame (geopandas imported lazily)
        attrs = pa.Table.from_pandas(batch.drop(columns=batch.geometry.name), preserve_index=False)
        wkb = shapely.to_wkb(batch.geometry.values, output_dimension=2)
        return attrs.append_column(GEOMETRY, pa.array(wkb, pa.binary()))
    raise VectorExportError(f"cannot write a {type(batch).__name__}; pass a GeoDataFrame or a pyarrow Table.")


def _shapefile_names(names: list[str], path: Path) -> list[str]:
    out = [n if n == GEOMETRY else n[:SHAPEFILE_NAME_CHARS] for n in names]
    if len(set(out)) != len(out):
        raise VectorExportError(
            f"{path}: field names {names} do not stay distinct when cut to the Shapefile's 10 characters. "
            "Rename them, or write a GeoPackage (.gpkg) or GeoParquet (.parquet)."
        )
    return out
