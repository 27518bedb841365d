"""`python -m compressor.report REPORT_JSON`: re-render report.md and its plots beside a report.json.

They go into the report's own folder because that is where the links to the
artifacts (relative to the run's output folder) lead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from compressor.errors import CompressorError


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Render report.md beside the given report.json; print its path.

    Returns:
        The exit code: 0, or 1 with one line on stderr when the report cannot be read.
    """
    parser = argparse.ArgumentParser(prog="python -m compressor.report", description=__doc__)
    parser.add_argument("report", type=Path, help="a report.json written by `compressor compress`")
    args = parser.parse_args(argv)
    try:
        written = render_file(args.report)
    except CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(written)
    return 0


def render_file(report_json: Path) -> Path:
    """Read a report.json and write report.md (and plots/) beside it; return report.md's path.

    Raises:
        CompressorError: The file is missing or is not JSON.
    """
    from compressor.report.markdown import write_markdown_report

    try:
        report = json.loads(Path(report_json).read_text())
    except OSError as exc:
        raise CompressorError(f"cannot read {report_json}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CompressorError(f"Invalid report. Expected JSON in {report_json}. Received: {exc}") from None
    return write_markdown_report(report, Path(report_json).parent)


if __name__ == "__main__":
    sys.exit(main())
