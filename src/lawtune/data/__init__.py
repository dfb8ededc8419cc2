"""Data: file formats (one module each), the record they are read into, the split, statistics.

``load_records`` is the one entry point; today it reads the JEC-QA release format (``jecqa.py``).
"""

from .jecqa import parse_record, load_records
from .records import (
    TYPE_NAMES,
    DataError,
    LoadResult,
    Record,
    count_repeated,
    data_stats,
    drop_overlap,
    sha256_file,
    split_records,
    statement_key,
    write_jsonl,
)

__all__ = ["TYPE_NAMES", "DataError", "LoadResult", "Record", "count_repeated", "data_stats", "drop_overlap",
           "load_records", "parse_record", "sha256_file", "split_records", "statement_key", "write_jsonl"]
