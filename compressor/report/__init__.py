"""The compression report: report.json for machines, report.md with plots for people.

report.json is assembled from the records of a run's stages and written by
`compressor.report.build` (`build_report`, `write_report`); its keys are the contract in
`compressor.report.schema`. report.md is rendered from report.json's dict:

    from compressor.report import write_markdown_report
    write_markdown_report(report, Path("build"))   # build/report.md, build/plots/*.png

Re-render a saved report with `python -m compressor.report build/report.json`.
matplotlib is imported only when plots are drawn.
"""

from compressor.report.markdown import render_markdown, write_markdown_report

__all__ = ["render_markdown", "write_markdown_report"]
