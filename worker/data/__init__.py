"""Dataset sources with stable sample IDs, Lethe's own copy of them, splits and erasure."""

from worker.data.catalog import (
    SampleSet,
    assign_splits,
    content_sha256,
    erase_samples,
    ingest,
    load_samples,
    load_split,
)
from worker.data.sources import SOURCES, RawDataset, SourceUnavailable, open_source

__all__ = [
    "SOURCES",
    "RawDataset",
    "SampleSet",
    "SourceUnavailable",
    "assign_splits",
    "content_sha256",
    "erase_samples",
    "ingest",
    "load_samples",
    "load_split",
    "open_source",
]
