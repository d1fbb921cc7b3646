"""Command line of the report tool: ``python -m lit_td3.report summarize|compare``.

Exit status: 0 for a summary written or a GO, 1 for a NO-GO, 2 for input that
cannot be used (the message names the path, tag or field). This module only
parses arguments and prints; the work is done by the package's public API.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from lit_td3.report.comparison import compare
from lit_td3.report.decision import EXIT_BAD_INPUT, EXIT_GO
from lit_td3.report.errors import ReportInputError
from lit_td3.report.events import load_run
from lit_td3.report.markdown import summary_table
from lit_td3.report.stats import summarize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_td3.report",
        description=(
            "Summarize a lit_td3 run's TensorBoard scalars, "
            "or compare two runs for a GO/NO-GO."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summarize", help="per-tag statistics of one run")
    summary.add_argument(
        "run_dir", help="the run's default_root_dir (event files found recursively)"
    )
    summary.add_argument(
        "--json", action="store_true", help="print JSON instead of a Markdown table"
    )
    comparison = commands.add_parser(
        "compare",
        help="judge a candidate run on the criteria; write report.md and plots",
    )
    comparison.add_argument("--baseline", required=True, help="run before the change")
    comparison.add_argument(
        "--candidate", required=True, help="run after the change (the one judged)"
    )
    comparison.add_argument(
        "--criteria",
        default=None,
        help="criteria YAML (default: the packaged go_no_go.yaml)",
    )
    comparison.add_argument(
        "--output", required=True, help="folder for report.md and the PNG plots"
    )
    return parser


def _json_safe(value: float) -> float | None:
    # NaN and infinity are not JSON; null says "could not be computed".
    return value if math.isfinite(value) else None


def _summarize(run_dir: str, as_json: bool) -> int:
    run = load_run(run_dir)
    summary = summarize(run)
    if as_json:
        document = {
            "run_dir": str(run.run_dir),
            "event_files": [str(p) for p in run.event_files],
            "tags": {
                tag: {k: _json_safe(v) for k, v in stats.items()}
                for tag, stats in summary.items()
            },
        }
        print(json.dumps(document, indent=2, allow_nan=False))
    else:
        print(f"# Summary of `{run.run_dir}` ({len(run.event_files)} event file(s))\n")
        print(summary_table(summary), end="")
    return EXIT_GO


def _compare(args: argparse.Namespace) -> int:
    decision = compare(args.baseline, args.candidate, args.criteria, args.output)
    print(decision.label)
    for line in decision.reasons:
        print(f"- {line}")
    for line in decision.warnings:
        print(f"- warning: {line}")
    print(f"report: {decision.report_path}")
    return decision.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "summarize":
            return _summarize(args.run_dir, args.json)
        return _compare(args)
    except ReportInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
