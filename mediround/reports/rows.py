"""Metric rows on disk: one Parquet file per evaluation, fixed schema, written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

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
    ]
)
REQUIRED_COLUMNS = ("dialogue_id", "round", "intersection", "union", "iou", "dice")


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write metric rows as a Parquet file with the fixed ROW_SCHEMA, atomically."""
    table = pa.Table.from_pylist([{name: row.get(name) for name in ROW_SCHEMA.names} for row in rows],
                                 schema=ROW_SCHEMA)
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
