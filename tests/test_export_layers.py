"""Export of the layer families edge models are built from: attention, grouped and depthwise
convolutions with LayerNorm and exact GELU, and recurrent layers; and the one-line error for
a layer no format can take, before any search.

Tolerance: 1e-4, the default `atol` every artifact is verified against. These tiny models'
float32 outputs move by ~1e-7 in LiteRT and onnxruntime (a different summation order);
a broken conversion (a wrong layout, a missing op, a dropped GELU term) moves them by
far more than 1e-4.
"""

from __future__ import annotations

import re
import sys
import textwrap

import numpy as np
import pytest

from compressor.errors import ExportError
from compressor.export.verify import export_and_verify, verification_inputs
from conftest import _keras
from families import (build_bidirectional, build_convnext_block, build_encoder, build_grouped, build_kws,
                      build_simple_rnn)

ATOL = 1e-4


FAMILIES = {
    "encoder": build_encoder,
    "grouped": build_grouped,
    "convnext_block": build_convnext_block,
    "kws": build_kws,
    "simple_rnn": build_simple_rnn,
    "bidirectional": build_bidirectional,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_to_tflite_and_onnx_within_tolerance(tmp_path, family):
    model = FAMILIES[family]()
    x = verification_inputs(model, None, samples=8)
    checks = export_and_verify(model, tmp_path, ("tflite", "onnx"), x, atol=ATOL)
    assert [c.format for c in checks] == ["tflite", "onnx"]
    for check in checks:
        assert check.passed and check.max_abs_diff <= ATOL, check.describe()
    # onnxruntime loaded it (verify ran it); nothing tf2onnx left unconverted remains in the graph.
    assert not {"Erfc", "StatefulPartitionedCall", "PartitionedCall"} & set(_onnx_ops(tmp_path / "model.onnx"))


def test_grouped_convolutions_become_onnx_conv_groups(tmp_path):
    import onnx

    model = build_convnext_block()
    export_and_verify(model, tmp_path, ("onnx",), verification_inputs(model, None, samples=2), atol=ATOL)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    groups = sorted(
        attr.i for node in proto.graph.node if node.op_type == "Conv" for attr in node.attribute if attr.name == "group"
    )
    assert groups == [16, 16]  # Conv2D(groups=16) and DepthwiseConv2D, each one grouped Conv
    assert "Erf" in _onnx_ops(tmp_path / "model.onnx")  # exact GELU kept exact, not a tanh approximation


def test_recurrent_tflite_runs_a_while_loop_at_batch_one(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from conftest import tflite_ops

    model = build_kws()
    x = verification_inputs(model, None, samples=3)  # 3 inputs through a batch-1 artifact
    (check,) = export_and_verify(model, tmp_path, ("tflite",), x, atol=ATOL)
    assert check.passed and check.samples == 3
    interpreter = Interpreter(model_path=str(tmp_path / "model.tflite"))
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [1, 49, 10]
    assert "WHILE" in tflite_ops(tmp_path / "model.tflite")[0]


UNCONVERTIBLE = textwrap.dedent(
    """
    import keras


    @keras.saving.register_keras_serializable(package="{pkg}")
    class ErfInv(keras.layers.Layer):
        '''The inverse error function: neither the TFLite builtins nor tf2onnx have it.'''

        def call(self, x):
            return keras.ops.erfinv(0.5 * keras.ops.tanh(x))
    """
)


@pytest.fixture
def erfinv_module(tmp_path, monkeypatch):
    """A user module with a layer no export format can take, importable by name."""
    import importlib
    import uuid

    name = f"export_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(UNCONVERTIBLE.format(pkg=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


def build_unconvertible(module):
    keras = _keras()
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="dense")(inputs)
    x = keras.layers.Dense(8, name="dense_1")(x)  # names that trace as dense_1 and dense_1_2: the scopes decide
    x = module.ErfInv(name="erf_inv")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="dense_1_1")(x), name="odd")


@pytest.mark.parametrize("fmt, name, op", [("tflite", "TFLite", "'tf.Erfinv' op"), ("onnx", "ONNX", "Erfinv")])
def test_unconvertible_layer_is_named_in_one_line(tmp_path, erfinv_module, fmt, name, op):
    model = build_unconvertible(erfinv_module)
    with pytest.raises(ExportError) as caught:
        export_and_verify(model, tmp_path, (fmt,), verification_inputs(model, None, samples=2), atol=ATOL)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"layer 'erf_inv' (ErfInv) cannot be exported to {name}: ")
    assert op in message
    assert not (tmp_path / f"model.{fmt}").exists()  # nothing half-converted left behind
    assert "call" not in vars(model.get_layer("erf_inv"))  # the tracing that named it left the layers alone


def test_compress_fails_on_an_unconvertible_layer_before_the_search(tmp_path, erfinv_module):
    import compressor

    model = build_unconvertible(erfinv_module)
    lines: list[str] = []
    with pytest.raises(ExportError, match=r"^layer 'erf_inv' \(ErfInv\) cannot be exported to ONNX: "):
        compressor.compress(model, out=tmp_path / "out", method="fixed_params", compression_factor=0.5,
                            export=("onnx",), log=lines.append)
    assert "converting the original model" in lines
    assert not any(line.startswith("searching") for line in lines)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_command_names_the_layer_in_one_line(tmp_path, erfinv_module):
    from typer.testing import CliRunner

    from compressor.cli.app import app

    build_unconvertible(erfinv_module).save(tmp_path / "odd.keras")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "odd.keras"), "--out", str(tmp_path / "out"),
                                      "--format", "tflite", "--custom-objects", erfinv_module.__name__])
    assert result.exit_code != 0
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"layer 'erf_inv' \(ErfInv\) cannot be exported to TFLite: ", lines[0])


def _onnx_ops(path):
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.slow  # ~35 s: ConvNeXtTiny's 28M parameters through tf2onnx (its TFLite export already worked)
def test_convnext_tiny_exports_to_onnx_within_tolerance(tmp_path):
    keras = _keras()
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3), classes=10)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)  # it rescales inside
    (check,) = export_and_verify(model, tmp_path, ("onnx",), x, atol=ATOL)
    assert check.passed and check.max_abs_diff <= ATOL, check.describe()
    assert not {"Erfc", "StatefulPartitionedCall"} & set(_onnx_ops(tmp_path / "model.onnx"))
