"""The load report: what was read, loaded and rejected per table."""

from __future__ import annotations

from dataclasses import dataclass

from propensity.raw_data.rejections import RejectedRows, describe


@dataclass
class LoadReport:
    """What was read, loaded and rejected per table."""

    files: dict[str, str]
    rows_read: dict[str, int]
    rows_loaded: dict[str, int]
    rejected: list[RejectedRows]
    duplicates_dropped: int
    items_added_from_events: int = 0

    def summary(self) -> str:
        """Return a human-readable multi-line account of the load."""
        lines = []
        for table, file in self.files.items():
            lines.append(
                f"{table}: {file}: {self.rows_read.get(table, 0)} rows read, "
                f"{self.rows_loaded.get(table, 0)} loaded"
            )
        if self.duplicates_dropped:
            lines.append(f"events: {self.duplicates_dropped} duplicate event_id rows dropped (first kept)")
        if self.items_added_from_events:
            lines.append(
                f"items: {self.items_added_from_events} item_ids seen only in events added "
                "without attributes"
            )
        for r in self.rejected:
            lines.append(f"rejected {r.count} rows of {r.file}, column {r.column}: {r.reason}")
            lines.extend(f"  {describe(r, row, value)}" for row, value in r.examples)
        return "\n".join(lines)
