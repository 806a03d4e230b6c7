"""Load and validate the raw event log (events, items, users) from CSV or Parquet files.

One job per module: schema (the raw schema), readers (find and read a table's file), parsing
(column values), rejections and report (what was rejected and loaded), events / items / users
(validate one table), dataset (a directory as a validated dataset), writer (Parquet out).
"""

from propensity.raw_data.dataset import RawDataset, StagedDataset, load_raw_dataset, stage_raw_dataset
from propensity.raw_data.errors import RawDataError
from propensity.raw_data.rejections import RejectedRows
from propensity.raw_data.report import LoadReport
from propensity.raw_data.schema import EVENT_TYPES, raw_schema
from propensity.raw_data.writer import write_raw_dataset, write_table

__all__ = [
    "EVENT_TYPES",
    "LoadReport",
    "RawDataError",
    "RawDataset",
    "RejectedRows",
    "StagedDataset",
    "load_raw_dataset",
    "raw_schema",
    "stage_raw_dataset",
    "write_raw_dataset",
    "write_table",
]
