"""The load report: what was read, loaded, rejected, set aside and ignored per table."""

from __future__ import annotations

from dataclasses import dataclass, field

from propensity.raw_data.rejections import RejectedRows, describe


@dataclass
class LoadReport:
    """What was read, loaded and rejected per table; nothing that was not loaded goes unmentioned."""

    files: dict[str, str]
    rows_read: dict[str, int]
    rows_loaded: dict[str, int]
    rejected: list[RejectedRows]
    duplicates_dropped: int
    items_added_from_events: int = 0
    blank_lines: dict[str, int] = field(default_factory=dict)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    quarantine: str | None = None  # directory of the quarantine files, when written

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
        for table, count in self.blank_lines.items():
            if count:
                lines.append(f"{table}: {count} blank lines skipped")
        for table, columns in self.ignored_columns.items():
            if columns:
                lines.append(f"{table}: columns not in the raw schema ignored: {', '.join(columns)}")
        for r in self.rejected:
            lines.append(f"rejected {r.count} rows of {r.file}, column {r.column}: {r.reason}")
            lines.extend(f"  {describe(r, row, value)}" for row, value in r.examples)
        if self.quarantine and (self.rejected or self.duplicates_dropped or any(self.blank_lines.values())):
            lines.append(f"quarantined rows (with line, column, reason and raw values): {self.quarantine}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The counts as JSON-ready data: the quarantine's summary.json."""
        return {
            "files": self.files,
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rejected": [
                {"file": r.file, "column": r.column, "reason": r.reason, "count": r.count,
                 "examples": [{"line_or_row": row, "value": value} for row, value in r.examples]}
                for r in self.rejected
            ],
            "duplicates_dropped": self.duplicates_dropped,
            "blank_lines": self.blank_lines,
            "ignored_columns": self.ignored_columns,
            "items_added_from_events": self.items_added_from_events,
            "quarantine": self.quarantine,
        }
