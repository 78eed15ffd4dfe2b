"""``conveyor check-spec | init``: write and check pipeline specs without computing anything.

conveyor check-spec PATH_OR_URL
conveyor init --from URL [--out my_pipeline.yaml] [--name my_pipeline]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from conveyor.cli import options


def add_commands(sub: Any) -> None:
    check = sub.add_parser("check-spec", help="validate a pipeline spec (no data is read)")
    check.add_argument("spec", help="a shipped spec name, or the path/URL of a spec YAML")
    options.debug(check)
    check.set_defaults(handler=cmd_check_spec)

    init = sub.add_parser("init", help="write a starting spec from a CSV or parquet file")
    init.add_argument("--from", dest="source", required=True, help="CSV/parquet file (any fsspec URL)")
    init.add_argument("--out", default=None, help="where to write the spec (default: <name>.yaml)")
    init.add_argument("--name", default=None, help="pipeline name (default: from the file name)")
    init.add_argument("--label", default=None, help="the label column (default: a guess, marked TODO)")
    options.debug(init)
    init.set_defaults(handler=cmd_init)


def cmd_check_spec(args: argparse.Namespace) -> int:
    from conveyor.tasks.spec import load_spec

    loaded = load_spec(args.spec)
    s = loaded.spec
    print(
        f"{loaded.where}: ok — pipeline '{s.name}' ({s.label.task}, label {s.label.name}), "
        f"{len(s.sources)} sources, {len(s.features.include)} features, {len(s.rules)} rules, "
        f"split {s.split.kind}, version {loaded.version}"
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from conveyor.tasks.spec import draft_spec

    text, name = draft_spec(args.source, name=args.name, label=args.label)
    out = Path(args.out or f"{name}.yaml")
    if out.exists():
        raise FileExistsError(f"{out} exists; pass --out to write elsewhere")
    out.write_text(text)
    print(
        f"wrote {out}: review the TODO lines, then `conveyor check-spec {out}` "
        f"and `conveyor run --spec {out}`"
    )
    return 0
