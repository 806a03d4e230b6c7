"""Importers that turn public e-commerce datasets into the raw event schema."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from propensity.raw_data import LoadReport, RawDataset, load_raw_dataset, write_raw_dataset


@dataclass
class ImportSummary:
    """Counts of one import: rows in, rows dropped per reason, and what was written."""

    dataset: str
    source: Path
    out_dir: Path
    rows_in: int
    dropped: dict[str, int]
    events_by_type: dict[str, int]
    users: int
    items: int
    first_event: pd.Timestamp
    last_event: pd.Timestamp
    seconds: float

    def __str__(self) -> str:
        lines = [f"{self.dataset}: {self.rows_in} source rows from {self.source}"]
        lines += [f"  dropped {count:>8}  {reason}" for reason, count in self.dropped.items()]
        lines += [f"  events  {count:>8}  {kind}" for kind, count in self.events_by_type.items()]
        lines.append(f"  users {self.users}, items {self.items}")
        lines.append(f"  time range {self.first_event} .. {self.last_event}")
        lines.append(f"  written to {self.out_dir} in {self.seconds:.1f} s")
        return "\n".join(lines)


def write_and_verify(
    name: str, source: Path, out_dir: Path, rows_in: int, dropped: dict[str, int],
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], started: float,
    progress: Callable[[str], object],
) -> ImportSummary:
    """Write the tables, reload them strictly and summarise what the loader sees."""
    events, items, users = tables
    empty = LoadReport({}, {}, {}, [], 0)
    write_raw_dataset(RawDataset(events, items, users, empty), out_dir)
    progress(f"{name}: wrote {len(events)} events, {len(items)} items, {len(users)} users to {out_dir}")
    # Reloading strictly proves the output satisfies the raw schema the rest of the project reads.
    loaded = load_raw_dataset(out_dir, strict=True, max_rejected_fraction=0.0)
    counts = loaded.events["event_type"].value_counts()
    summary = ImportSummary(
        dataset=name, source=source, out_dir=out_dir, rows_in=rows_in, dropped=dropped,
        events_by_type={k: int(v) for k, v in counts.items()},
        users=int(loaded.events["user_id"].nunique()), items=len(loaded.items),
        first_event=loaded.events["event_time"].iloc[0], last_event=loaded.as_of,
        seconds=time.perf_counter() - started,
    )
    progress(str(summary))
    return summary


# Imported after ImportSummary exists: the importer modules import it from this package.
from propensity.importers.diginetica import import_diginetica  # noqa: E402
from propensity.importers.rees46 import import_rees46  # noqa: E402
from propensity.importers.uci_online_retail import import_uci_online_retail  # noqa: E402

IMPORTERS: dict[str, Callable[..., ImportSummary]] = {
    "uci-online-retail": import_uci_online_retail,
    "rees46": import_rees46,
    "diginetica": import_diginetica,
}

__all__ = ["IMPORTERS", "ImportSummary", "import_diginetica", "import_rees46", "import_uci_online_retail"]
