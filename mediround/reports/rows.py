"""Metric rows on disk: one Parquet file per evaluation, one fixed schema in every mode, written atomically.

Every file has the same columns whether it holds one track or a sweep: ``beta`` (null = JCM off or
unknown) and ``references`` (``"predicted"``, ``"ground-truth"``, or null when unknown) are always there.
``difficulty`` is what tables group by (the round's own difficulty, else its dialogue's);
``dialogue_difficulty`` and ``round_difficulty`` keep the two levels apart. The run manifest of the
predictions scored (``mediround.data.run_manifest``) travels as file metadata under ``mediround.run``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mediround.atomic import atomic_path
from mediround.errors import DataError

ROW_SCHEMA = pa.schema(
    [
        ("dialogue_id", pa.string()),
        ("round", pa.int32()),
        ("ref_round", pa.int32()),
        ("scenario", pa.string()),
        ("modality", pa.string()),
        ("difficulty", pa.string()),
        ("dialogue_difficulty", pa.string()),
        ("round_difficulty", pa.string()),
        ("names_target", pa.bool_()),
        ("entity", pa.string()),
        ("intersection", pa.int64()),
        ("union", pa.int64()),
        ("pred_area", pa.int64()),
        ("gt_area", pa.int64()),
        ("iou", pa.float64()),
        ("dice", pa.float64()),
        ("missing", pa.bool_()),
        ("jcm_score", pa.float64()),
        ("refined", pa.bool_()),
        ("beta", pa.float64()),
        ("references", pa.string()),
    ]
)
RUN_METADATA_KEY = b"mediround.run"
REFERENCES = {False: "predicted", True: "ground-truth"}
"""The ``references`` column of a track, by whether it used teacher forcing."""
REQUIRED_COLUMNS = ("dialogue_id", "round", "intersection", "union", "iou", "dice")


def write_rows(path: str | os.PathLike, rows: Sequence[dict], manifest: Mapping | None = None) -> None:
    """Write metric rows as a Parquet file with the fixed ROW_SCHEMA, atomically, with the run
    ``manifest`` of the predictions as file metadata."""
    schema = ROW_SCHEMA.with_metadata({RUN_METADATA_KEY: json.dumps(manifest, sort_keys=True)}) if manifest else ROW_SCHEMA
    table = pa.Table.from_pylist([{name: row.get(name) for name in ROW_SCHEMA.names} for row in rows],
                                 schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Metric rows from a Parquet file written by ``write_rows`` (e.g. a baseline)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no such metrics file") from None
    except (OSError, pa.ArrowException) as error:
        raise DataError(str(path), None, None, f"not a readable Parquet file: {error}") from None
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise DataError(str(path), None, column, "missing column; not a MediRound metrics file")
    return table.to_pylist()


def read_run_metadata(path: str | os.PathLike) -> dict | None:
    """The run manifest a metrics file was written with (None when it has none, or is no readable Parquet)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    raw = metadata.get(RUN_METADATA_KEY)
    return json.loads(raw) if raw else None
