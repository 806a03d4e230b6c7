"""`propensity forget`: erase shoppers from everything the product manages, on this machine's files and stores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from propensity.settings import settings_from_args


def add_forget_command(sub: argparse._SubParsersAction, paths: object) -> None:
    p = sub.add_parser(
        "forget",
        help="erase shoppers: event log, online features, prepared data, feature tables, served log, batch outputs (docs/privacy.md)",
    )
    paths(p)
    p.add_argument("user_ids", nargs="*", metavar="USER_ID", help="shoppers to forget")
    p.add_argument("--from-file", help="a file of user ids, one a line (blank lines skipped); with USER_IDs, both are forgotten")
    p.set_defaults(func=cmd_forget)


def read_ids(path: Path) -> list[str]:
    """One id a line, surrounding whitespace stripped, blank lines skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"propensity forget: --from-file {path}: cannot read it ({error})") from None
    return [line.strip() for line in lines if line.strip()]


def cmd_forget(args: argparse.Namespace) -> int:
    from propensity.erasure import ErasureError, forget_users

    settings = settings_from_args(args)
    ids = list(args.user_ids) + (read_ids(Path(args.from_file)) if args.from_file else [])
    try:
        report = forget_users(settings, ids)
    except ErasureError as error:
        source = f" (--from-file {args.from_file})" if args.from_file else ""
        print(f"propensity forget: {error}{source}", file=sys.stderr)
        return 2
    print(report.summary())  # counts only: the ids are not repeated in output that may end up in a log
    return 0
