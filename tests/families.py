"""Small models of the architecture families edge models are built from (random weights, seed 0).

Each builder returns an uncompiled Functional `keras.Model` of a few thousand parameters:
the layer kinds of a real model of its family at toy widths, so a test can take it through
inspect, compress, export and parity in seconds. `FAMILIES` names those of
tests/test_architectures.py, which takes each end to end; tests/test_export_layers.py exports
some of them and two more, and benchmarks/architectures.py builds them at realistic sizes
through their keyword arguments.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _keras():
    import keras

    keras.utils.set_random_seed(0)
    return keras


def without_zeros(model, scale: float = 0.05, seed: int = 0):
    """Give every exactly-zero weight (a fresh model's biases, LayerNorm and BatchNorm offsets and means)
    a small random value, as training would: report.json counts a weight with >= 30% zeros by its
    non-zeros, so a fresh model's zero biases would not count against the budget. Returns the model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for weight in model.weights:
        values = np.asarray(weight)
        zeros = values == 0
        if zeros.any():
            weight.assign(np.where(zeros, rng.normal(0.0, scale, values.shape), values).astype(values.dtype))
    return model


def build_encoder(tokens: int = 8, features: int = 16, heads: int = 2, hidden: int = 32, blocks: int = 1,
                  classes: int = 4):
    """A transformer encoder: MultiHeadAttention, LayerNormalization, a GELU MLP, per block."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((tokens, features))
    x = inputs
    for _ in range(blocks):
        x = layers.LayerNormalization()(x + layers.MultiHeadAttention(heads, features // heads)(x, x))
        mlp = layers.Dense(features)(layers.Dense(hidden, activation="gelu")(x))
        x = layers.LayerNormalization()(x + mlp)
    outputs = layers.Dense(classes, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="encoder")


def build_grouped():
    """Grouped convolutions, 1 < groups < channels."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 8))
    x = layers.Conv2D(16, 3, padding="same", groups=4, activation="relu")(inputs)
    x = layers.Conv2D(16, 1, groups=2)(x)
    outputs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="grouped")


def build_resnext(size: int = 8, channels: int = 16, width: int = 32, groups: int = 4, classes: int = 4):
    """A ResNeXt-style block: 1x1, grouped 3x3 (`groups` groups), 1x1, residual."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((size, size, channels))
    x = layers.Conv2D(width, 1, activation="relu")(inputs)
    x = layers.Conv2D(width, 3, padding="same", groups=groups, activation="relu")(x)
    x = layers.Add()([inputs, layers.Conv2D(channels, 1)(x)])
    outputs = layers.Dense(classes, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="resnext")


def build_convnext_block():
    """A ConvNeXt block: depthwise Conv2D(groups=C), LayerNorm, exact GELU MLP, residual; then a DepthwiseConv2D."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 16))
    x = layers.LayerNormalization(epsilon=1e-6)(layers.Conv2D(16, 7, padding="same", groups=16)(inputs))
    x = inputs + layers.Dense(16)(layers.Dense(64, activation="gelu")(x))
    x = layers.DepthwiseConv2D(3, padding="same")(x)
    outputs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="convnext_block")


def build_convnext(size: int = 16, channels: int = 16, blocks: int = 1, classes: int = 4):
    """A ConvNeXt stage: a patchify stem, then blocks of depthwise Conv2D(groups=C) 7x7, LayerNorm,
    a 4x GELU MLP and a residual."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = layers.LayerNormalization(epsilon=1e-6)(layers.Conv2D(channels, 4, strides=4)(inputs))
    for _ in range(blocks):
        y = layers.LayerNormalization(epsilon=1e-6)(layers.Conv2D(channels, 7, padding="same", groups=channels)(x))
        x = x + layers.Dense(channels)(layers.Dense(4 * channels, activation="gelu")(y))
    x = layers.LayerNormalization(epsilon=1e-6)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x), name="convnext")


def build_kws(units: int = 16, classes: int = 12):
    """Keyword spotting: LSTM(return_sequences) -> GRU -> Dense on 49 frames of 10 MFCCs."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((49, 10))
    x = layers.GRU(units)(layers.LSTM(units, return_sequences=True)(inputs))
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x), name="kws")


def build_simple_rnn(units: int = 8, steps: int = 10, features: int = 6):
    keras = _keras()
    inputs = keras.Input((steps, features))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.SimpleRNN(units)(inputs)), name="simple_rnn")


def build_bidirectional(units: int = 8, steps: int = 10, features: int = 6):
    keras = _keras()
    inputs = keras.Input((steps, features))
    x = keras.layers.Bidirectional(keras.layers.LSTM(units))(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="bidirectional")


def build_mini_xception(size: int = 16, widths: tuple[int, ...] = (8, 16), classes: int = 4):
    """A mini-Xception (the FER-2013 one's layout): a conv stem, then per width two
    SeparableConv2D + BatchNorm, a strided max-pool and a residual 1x1 strided projection."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(widths[0], 3, use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for width in widths:
        residual = layers.BatchNormalization()(layers.Conv2D(width, 1, strides=2, padding="same", use_bias=False)(x))
        x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.BatchNormalization()(layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x))
        x = layers.Add()([layers.MaxPooling2D(3, strides=2, padding="same")(x), residual])
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(classes, 3, padding="same")(x))
    return keras.Model(inputs, layers.Softmax()(x), name="mini_xception")


def build_keras2_mini_xception(size: int = 24, widths: tuple[int, ...] = (16, 32, 64, 128), classes: int = 7):
    """The FER-2013 mini-Xception as published (two 3x3 convs of 8, then per width a residual module of two
    SeparableConv2D with an L2 penalty and a strided 1x1 projection; a 3x3 conv to the classes) built and saved
    as `.h5` by Keras 2 (tf_keras), then loaded as a user's file is (`compressor.io.models.load_model`)."""
    import tempfile
    from pathlib import Path

    import tf_keras

    from compressor.io.models import load_model

    tf_keras.utils.set_random_seed(0)
    layers, l2 = tf_keras.layers, tf_keras.regularizers.l2(0.01)
    inputs = tf_keras.Input((size, size, 1))
    x = inputs
    for _ in range(2):
        x = layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=l2)(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
    for width in widths:
        residual = layers.BatchNormalization()(layers.Conv2D(width, 1, strides=2, padding="same", use_bias=False)(x))
        x = layers.SeparableConv2D(width, 3, padding="same", depthwise_regularizer=l2, use_bias=False)(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
        x = layers.SeparableConv2D(width, 3, padding="same", depthwise_regularizer=l2, use_bias=False)(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(layers.BatchNormalization()(x))
        x = layers.add([x, residual])
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(classes, 3, padding="same")(x))
    legacy = tf_keras.Model(inputs, layers.Activation("softmax")(x), name="keras2_mini_xception")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mini_xception.h5"
        legacy.save(path, save_format="h5")
        return load_model(path)


def build_multi_io(size: int = 8, features: int = 6, width: int = 8, classes: int = 4):
    """Two inputs (an image and a vector), two outputs (class probabilities and a regression value)."""
    keras = _keras()
    layers = keras.layers
    image = keras.Input((size, size, 3), name="image")
    vector = keras.Input((features,), name="vector")
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(image)
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(2 * width, 3, strides=2, activation="relu")(x))
    v = layers.Dense(width, activation="relu")(vector)
    joint = layers.Dense(2 * width, activation="relu")(layers.Concatenate()([x, v]))
    label = layers.Dense(classes, activation="softmax", name="label")(joint)
    value = layers.Dense(1, name="value")(joint)
    return keras.Model([image, vector], [label, value], name="multi_io")


def build_unet(size: int = 16, width: int = 4, depth: int = 2, classes: int = 3):
    """A U-Net: conv pairs down by max-pooling, up by transposed convs, skips concatenated, per-pixel softmax."""
    keras = _keras()
    layers = keras.layers

    def pair(x, filters):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        return layers.Conv2D(filters, 3, padding="same", activation="relu")(x)

    inputs = keras.Input((size, size, 3))
    x, skips = inputs, []
    for level in range(depth):
        x = pair(x, width * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = pair(x, width * 2**depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(width * 2**level, 2, strides=2)(x)
        x = pair(layers.Concatenate()([x, skips[level]]), width * 2**level)
    outputs = layers.Conv2D(classes, 1, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="unet")


def build_cnn(size: int = 16, width: int = 8, classes: int = 4):
    """A plain CNN: conv, BatchNorm, ReLU, max-pool, twice, then two Dense layers."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((size, size, 3))
    x = inputs
    for filters in (width, 2 * width):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(x)))
        x = layers.MaxPooling2D()(x)
    x = layers.Dense(4 * width, activation="relu")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x), name="cnn")


def build_tcn(steps: int = 32, features: int = 3, width: int = 8, levels: int = 3, classes: int = 5):
    """A temporal convolutional network: causal dilated Conv1D pairs (dilation 1, 2, 4, ...) with residuals."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((steps, features))
    x = layers.Conv1D(width, 1)(inputs)
    for level in range(levels):
        y = layers.Conv1D(width, 3, padding="causal", dilation_rate=2**level, activation="relu")(x)
        y = layers.Conv1D(width, 3, padding="causal", dilation_rate=2**level)(y)
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x), name="tcn")


FAMILIES = {
    "kws": build_kws,
    "simple_rnn": build_simple_rnn,
    "bidirectional": build_bidirectional,
    "encoder": build_encoder,
    "resnext": build_resnext,
    "convnext": build_convnext,
    "mini_xception": build_mini_xception,
    "keras2_mini_xception": build_keras2_mini_xception,
    "multi_io": build_multi_io,
    "unet": build_unet,
    "cnn": build_cnn,
    "tcn": build_tcn,
}
"""The families of the architecture matrix (tests/test_architectures.py) at their toy sizes, by name."""
