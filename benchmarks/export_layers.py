"""Export the architectures of issue 15's table to TFLite and ONNX and check their parity.

    python benchmarks/export_layers.py > benchmarks/export_layers.md

For each model (random weights, seed 0): parameters, then per format the conversion
and verification time and the largest absolute output difference from Keras on 8
seeded inputs (the check every artifact passes at `atol` 1e-4), and for ONNX the
grouped `Conv` nodes and `Erf` nodes the graph holds.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def convnext_tiny():
    import keras

    return keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3), classes=10)


def encoder():
    """Two transformer encoder blocks on 49 tokens of 64 features (MHA, LayerNorm, exact GELU MLP)."""
    import keras

    layers = keras.layers
    inputs = keras.Input((49, 64))
    x = inputs
    for _ in range(2):
        x = layers.LayerNormalization()(x + layers.MultiHeadAttention(4, 16)(x, x))
        x = layers.LayerNormalization()(x + layers.Dense(64)(layers.Dense(256, activation="gelu")(x)))
    outputs = layers.Dense(12, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="encoder")


def kws():
    """Keyword spotting: LSTM(64) -> GRU(64) -> Dense(12) on 49 frames of 10 MFCCs."""
    import keras

    layers = keras.layers
    inputs = keras.Input((49, 10))
    x = layers.GRU(64)(layers.LSTM(64, return_sequences=True)(inputs))
    return keras.Model(inputs, layers.Dense(12, activation="softmax")(x), name="kws")


def grouped():
    """A ResNeXt-style stage: 1x1, grouped 3x3 (32 groups), 1x1, residual."""
    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 64))
    x = layers.Conv2D(128, 1, activation="relu")(inputs)
    x = layers.Conv2D(128, 3, padding="same", groups=32, activation="relu")(x)
    x = layers.Add()([inputs, layers.Conv2D(64, 1)(x)])
    outputs = layers.Dense(10, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="resnext_stage")


MODELS = {"ConvNeXtTiny 64x64": convnext_tiny, "transformer encoder": encoder, "KWS LSTM->GRU": kws,
          "ResNeXt stage": grouped}


def run(name: str, out: Path) -> str:
    import keras
    import onnx

    from compressor.export.verify import export_and_verify

    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x = np.random.default_rng(0).standard_normal((8, *model.inputs[0].shape[1:])).astype(np.float32)
    if name.startswith("ConvNeXt"):
        x = np.random.default_rng(0).uniform(0, 255, x.shape).astype(np.float32)  # it rescales inside
    cells = [name, f"{model.count_params():,}"]
    for fmt in ("tflite", "onnx"):
        start = time.perf_counter()
        (check,) = export_and_verify(model, out, (fmt,), x, atol=1e-4, stem=name.split()[0])
        cells += [f"{time.perf_counter() - start:.1f}", f"{check.max_abs_diff:.2g}", "yes" if check.passed else "NO"]
    nodes = onnx.load(str(check.path)).graph.node
    grouped_convs = sum(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in nodes)
    cells += [str(grouped_convs), str(sum(n.op_type == "Erf" for n in nodes))]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; atol 1e-4, 8 inputs\n")
    print("| model | params | TFLite s | TFLite max diff | passed | ONNX s | ONNX max diff | passed | grouped Conv | Erf |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            print(run(name, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
