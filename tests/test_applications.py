"""Keras application architectures (weights=None) export with parity.

These are the graphs users bring (ResNet50, MobileNetV2, EfficientNetB0, DenseNet121).
A 64×64 input keeps conversion fast without changing the parameter count or the
graph structure. Tolerance: outputs are softmax probabilities; float32 kernels in
LiteRT and onnxruntime reorder sums over up to 2048 channels, so 1e-4 (the CLI
default) is the bound.
"""

from __future__ import annotations

import numpy as np
import pytest

from compressor.export.verify import export_and_verify

APPLICATIONS = ["MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121"]


@pytest.mark.slow
@pytest.mark.parametrize("name", APPLICATIONS)
def test_application_exports_within_tolerance(tmp_path, name):
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    # Realistic pixel-range inputs: these models expect images, not unit noise.
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    if name in ("MobileNetV2", "ResNet50", "DenseNet121"):
        x = x / 127.5 - 1.0  # their preprocess_input ranges; EfficientNet rescales inside
    checks = export_and_verify(model, tmp_path, ("tflite", "onnx"), x, atol=1e-4)
    for check in checks:
        assert check.passed, check.describe()
        assert check.top1_agreement == 1.0
