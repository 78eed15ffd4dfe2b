"""``conveyor verify | gc | backup | restore``: keep a storage root honest and copied."""

from __future__ import annotations

import argparse
import json
from typing import Any

from conveyor.cli import options


def _root(cmd: argparse.ArgumentParser) -> None:
    options.storage(cmd)


def add_commands(sub: Any) -> None:
    verify = sub.add_parser("verify", help="check every committed version's files against its manifest")
    _root(verify)
    verify.add_argument("--sizes-only", action="store_true", help="skip the sha256 pass (fast)")
    verify.add_argument("--only", nargs="*", default=None, help="dataset or model names to check")
    verify.set_defaults(handler=cmd_verify)

    gc = sub.add_parser("gc", help="list (or with --apply remove) files no reader will trust")
    _root(gc)
    gc.add_argument("--apply", action="store_true", help="remove them (default: dry run)")
    gc.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="leave files younger than this many seconds (a run may still be writing) (default: %(default)s)",
    )
    gc.set_defaults(handler=cmd_gc)

    backup = sub.add_parser("backup", help="copy the committed versions and aliases of a root to another URL")
    _root(backup)
    backup.add_argument("--to", required=True, help="destination root URL")
    backup.add_argument("--only", nargs="*", default=None, help="dataset or model names to copy")
    backup.set_defaults(handler=cmd_backup)

    restore = sub.add_parser("restore", help="copy a backup's committed versions and aliases into a root")
    _root(restore)
    restore.add_argument("--from", dest="source", required=True, help="backup root URL")
    restore.add_argument("--only", nargs="*", default=None, help="dataset or model names to restore")
    restore.set_defaults(handler=cmd_restore)

    for cmd in (verify, gc, backup, restore):
        options.json_output(cmd, help="print the report as JSON")


def _print(args: argparse.Namespace, report: dict[str, Any], lines: list[str]) -> None:
    print(json.dumps(report, indent=2) if args.json else "\n".join(lines))


def cmd_verify(args: argparse.Namespace) -> int:
    from conveyor.resources import open_store
    from conveyor.store.maintenance import verify

    store = open_store(args.storage_url)
    report = verify(store, checksums=not args.sizes_only, names=set(args.only) if args.only else None)
    lines = [
        f"checked {report.checked} committed versions under {store.root}: "
        + ("all match their manifests" if report.ok else f"{len(report.problems)} do not")
    ]
    lines += [f"  {rel}: {'; '.join(problems)}" for rel, problems in report.problems.items()]
    _print(args, {"root": store.root, "checked": report.checked, "problems": report.problems}, lines)
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from conveyor.resources import open_store
    from conveyor.store.maintenance import gc

    store = open_store(args.storage_url)
    report = gc(store, apply=args.apply, min_age_s=args.min_age)
    verb = "removed" if report.removed else "would remove (dry run; --apply to remove)"
    lines = [f"{verb} {len(report.orphans)} orphaned files, {report.bytes:,} bytes, under {store.root}"]
    lines += [f"  {o.path}  ({o.reason}, {o.bytes:,} bytes)" for o in report.orphans]
    if report.skipped_young:
        lines.append(
            f"  left {report.skipped_young} uncommitted files younger than {args.min_age:.0f}s alone"
        )
    _print(
        args,
        {
            "root": store.root,
            "removed": report.removed,
            "bytes": report.bytes,
            "skipped_young": report.skipped_young,
            "orphans": [o.__dict__ for o in report.orphans],
        },
        lines,
    )
    return 0


def _copy(args: argparse.Namespace, src_url: str, dst_url: str) -> int:
    from conveyor.resources import open_store
    from conveyor.store.maintenance import copy_root

    src, dst = open_store(src_url), open_store(dst_url)
    report = copy_root(src, dst, names=set(args.only) if args.only else None)
    lines = [
        f"{src.root} -> {dst.root}: copied {len(report.copied)} versions ({report.bytes:,} bytes), "
        f"{len(report.skipped)} already there and verified, {report.aliases} alias pointers, "
        f"{len(report.failed)} failed"
    ]
    lines += [f"  FAILED {rel}: {why}" for rel, why in report.failed.items()]
    _print(
        args,
        {
            "from": src.root,
            "to": dst.root,
            "copied": report.copied,
            "skipped": report.skipped,
            "failed": report.failed,
            "aliases": report.aliases,
            "bytes": report.bytes,
        },
        lines,
    )
    return 0 if report.ok else 1


def cmd_backup(args: argparse.Namespace) -> int:
    return _copy(args, args.storage_url, args.to)


def cmd_restore(args: argparse.Namespace) -> int:
    return _copy(args, args.source, args.storage_url)
