"""Parquet tables (manifests, quarantine, captions) written atomically and read with pyarrow."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import atomic_write, exists, filesystem


def write_table(url: str, rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """Write rows (or a table) as one parquet file at `url`, atomically. Returns the table written."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()  # manifests are small; pyarrow wants a seekable-looking file
    pq.write_table(table, buf)
    with atomic_write(url) as out:
        out.write(buf.getvalue())
    return table


def read_table(url: str) -> pa.Table:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"table {url} does not exist")
    with fs.open(path, "rb") as f:
        data = f.read()
    # From memory, not the fsspec file: pyarrow reading a Python file object on its own threads can abort
    # the interpreter at exit ("terminate called without an active exception").
    return pq.read_table(pa.BufferReader(data))


def read_rows(url: str) -> list[dict]:
    """All rows as dicts; an absent table reads as no rows."""
    return read_table(url).to_pylist() if exists(url) else []
