"""Data: file formats (one module each), the record they are read into, the split, statistics.

``load_records`` (``load.py``) is the one entry point; it reads JEC-QA (``jecqa.py``), AGIEval (``agieval.py``)
and LawBench (``lawbench.py``) files.
"""

from .jecqa import parse_record
from .load import FORMATS, load_records, write_without
from .records import (
    TYPE_NAMES,
    DataError,
    LoadResult,
    Record,
    count_repeated,
    data_stats,
    drop_overlap,
    find_overlap,
    legacy_statement_key,
    question_key,
    sha256_file,
    split_records,
    statement_key,
    write_jsonl,
)

__all__ = ["FORMATS", "TYPE_NAMES", "DataError", "LoadResult", "Record", "count_repeated", "data_stats", "drop_overlap",
           "find_overlap", "legacy_statement_key", "load_records", "parse_record", "question_key", "sha256_file",
           "split_records", "statement_key", "write_jsonl", "write_without"]
