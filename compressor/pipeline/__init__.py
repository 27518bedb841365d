"""`compress` end to end: load → model stages (search, or replay a plan) → export → verify → time → report.

    report = compress(CompressOptions(model=Path("model.keras"), out=Path("build"),
                                      method="fixed_loss", max_acc_loss=0.02, data="val.npz"))
    report["status"]      # "ok" | "budget_not_met"

The run is a sequence of stages sharing one run context (`context.RunContext`): the
model stages — blocks, channels, per-layer techniques, fine-tuning, gating (`stages`) — each
search and keep a record that the plan is made of, and replay from it; the output
stages — export and verification (`export`), timing (`timing`) — and the report
(`compressor.report.build`) then run alike after a search or a replay. How one budget
is shared between the stages is `policy` (pure functions).

Accuracy in the report is measured on held-out data the search did not use
(`test_data`, or a stratified split of `data`), on the exported artifacts themselves
(TFLite first), and compared with the original model's artifact of the same format,
timed in the same interleaved run.

Importing this package loads no TensorFlow (the CLI checks inputs before it loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from compressor.pipeline.context import Log, Progress
from compressor.pipeline.data import Inputs, check_data_and_plan, split_data

if TYPE_CHECKING:
    import keras

    from compressor.config import CompressOptions

__all__ = ["Inputs", "Log", "Progress", "check_inputs", "compress", "compress_model", "split_data"]


def compress(options: CompressOptions, progress: Optional[Progress] = None, log: Optional[Log] = None,
             inputs: Optional[Inputs] = None) -> dict[str, Any]:
    """Run one compression and write its outputs into `options.out`.

    Everything is written into a staging folder first and moved into `options.out`
    only when the run finishes, so an interrupted or failed run leaves the folder as
    it was. A folder that holds earlier results is refused unless `options.overwrite`.

    Args:
        options: The run's options.
        progress: Called as progress(stage, done, total) during long steps.
        log: Called with one line per step.
        inputs: In-memory model and data used instead of the files the options name.

    Returns:
        The report (also written to `out/report.json`, with `out/report.md`), schema
        in the README.

    Raises:
        CompressorError: Bad input, or a failure the user can act on.
    """
    return compress_model(options, progress, log, inputs)[0]


def compress_model(options: CompressOptions, progress: Optional[Progress] = None, log: Optional[Log] = None,
                   inputs: Optional[Inputs] = None) -> tuple[dict[str, Any], keras.Model]:
    """`compress`, also returning the compressed Keras model: (report, model)."""
    from compressor.io.outdir import staged_output
    from compressor.pipeline.run import compress_into

    with staged_output(options.out, options.overwrite, options.input_files()) as staging:
        return compress_into(options, staging, progress or (lambda stage, done, total: None),
                             log or (lambda message: None), inputs or Inputs())


def check_inputs(options: CompressOptions) -> None:
    """Refuse missing or damaged input files before any model work (and before TensorFlow loads).

    Checks the model path (present, of a kind we read, intact), each data option
    (an existing path or a `pkg.module:function` hook), and the plan to replay.

    Raises:
        CompressorError: One line naming the input and what is wrong with it.
    """
    from compressor.io.model_files import check_model_path

    check_model_path(options.model)
    check_data_and_plan(options)
