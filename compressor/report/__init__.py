"""The compression report for people: report.md with plots, rendered from report.json's dict.

    from compressor.report import write_markdown_report
    write_markdown_report(report, Path("build"))   # build/report.md, build/plots/*.png

Re-render a saved report with `python -m compressor.report build/report.json`.
matplotlib is imported only when plots are drawn.
"""

from compressor.report.markdown import render_markdown, write_markdown_report

__all__ = ["render_markdown", "write_markdown_report"]
