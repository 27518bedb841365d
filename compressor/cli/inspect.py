"""`compressor inspect`: per-layer parameters, FLOPs and applicable techniques of a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.cli.console import (
    console,
    err_console,
    handle_errors,
    load_tensorflow,
    print_json,
    stdout_to_stderr,
)
from compressor.cli.options import AllowModelCodeOpt, CustomObjectsOpt, JsonOpt, ModelArg

if TYPE_CHECKING:
    from compressor.api.inspecting import Inspection


@handle_errors
def inspect_command(
    model: ModelArg,
    custom_objects: CustomObjectsOpt = None,
    allow_model_code: AllowModelCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show each layer of MODEL: output shape, parameters, FLOPs, and which techniques apply.

    FLOPs are counted at batch 1, a multiply-accumulate as 2.
    """
    from compressor.io.model_files import check_model_path

    check_model_path(model)  # a missing or damaged model ends here, before TensorFlow loads
    load_tensorflow()
    from compressor.api.inspecting import inspect

    with stdout_to_stderr():
        inspection = inspect(model, custom_objects=custom_objects or (), allow_model_code=allow_model_code)
    if inspection.free_inputs:
        err_console.print(
            f"[yellow]warning:[/] input(s) {', '.join(inspection.free_inputs)} have free dimensions besides the batch; "
            "layers whose shapes depend on them count 0 FLOPs",
            soft_wrap=True,
        )
    if json_out:
        print_json(inspection.to_dict())
    else:
        _render(inspection, title=f"{inspection.model}: {len(inspection.layers)} layers")


def _render(cost: "Inspection", title: str) -> None:
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        caption="FLOPs at batch 1; a multiply-accumulate counts 2",
        box=box.SIMPLE_HEAD,
        show_footer=True,
        pad_edge=False,
    )
    table.add_column("layer", overflow="fold", min_width=16, footer="total")
    table.add_column("type", overflow="fold", min_width=10)
    table.add_column("output", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True, footer=f"{cost.params:,}")
    table.add_column("FLOPs", justify="right", no_wrap=True, footer=human_count(cost.flops))
    table.add_column("techniques", min_width=8)
    for layer in cost.layers:
        table.add_row(
            layer.name,
            layer.type,
            _shape_text(layer.output_shape),
            f"{layer.params:,}",
            human_count(layer.flops),
            ", ".join(layer.techniques),
        )
    console.print(table)
    console.print(f"Total: {cost.params:,} parameters, {cost.flops:,} FLOPs ({human_count(cost.flops)})")
    for kind, tensors in (("inputs", cost.inputs), ("outputs", cost.outputs)):
        if tensors:
            shown = ", ".join(f"{name} {_shape_text((None, *shape))}" for name, shape in tensors)
            console.print(f"{kind.capitalize()}: {shown}", soft_wrap=True)


def human_count(value: int) -> str:
    """A count with a K/M/G unit and three significant digits: 1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _shape_text(shape: tuple) -> str:
    """Per-sample shape, batch dropped: (None, 8, 8, 16) -> '8x8x16'; '?' for free dims."""
    if shape and isinstance(shape[0], tuple):
        return " ".join(_shape_text(s) for s in shape)
    dims = ["?" if d is None else str(d) for d in shape[1:]]
    return "x".join(dims) if dims else "scalar"
