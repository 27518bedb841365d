"""Reference architectures: plain Keras 3 Functional models built from standard layers.

Every builder returns an uncompiled `keras.Model` whose layers are all built-in
Keras layers with readable names, so the models save to `.keras`, reload without
this package, and convert to TFLite and ONNX. They cover the graph patterns the
compressor has to handle: residual Adds with projection shortcuts (ResNet),
depthwise-separable convolutions (MobileNet), 1-D convolutions (temporal CNN), and
plain conv stacks with a large Flatten → Dense head (VGG).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import keras
from keras import layers

RESNET_DEPTHS = (20, 32, 56)
# Keras defaults to 0.99; the CIFAR references (PyTorch momentum 0.1) use 0.9, which
# also lets the moving statistics keep up in short trainings of a few hundred steps.
BN_MOMENTUM = 0.9


def resnet_cifar(
    depth: int = 20,
    width: int = 16,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    bn_momentum: float = BN_MOMENTUM,
) -> keras.Model:
    """CIFAR-style ResNet (He et al. 2016, section 4.2).

    A 3x3 stem convolution, then 3 stages of n basic blocks each (depth = 6n + 2),
    with `width`, 2·`width` and 4·`width` filters. A basic block is
    conv3x3-BN-ReLU-conv3x3-BN, added to its shortcut, then ReLU. The first block of
    stages 2 and 3 halves the resolution with stride 2 and projects its shortcut
    with a strided 1x1 convolution + BN. Global average pooling and a softmax Dense
    layer close the network.

    Layers are named `stem_conv`, `stage2_block1_conv1`, `stage2_block1_shortcut_conv`,
    `stage2_block1_add`, ..., `predictions`.

    Args:
        depth: Number of weighted layers on the main path: 20, 32 or 56.
        width: Filters of the first stage.
        input_shape: Per-sample input shape (height, width, channels).
        num_classes: Number of output classes.
        bn_momentum: Momentum of the BatchNormalization moving statistics.

    Returns:
        An uncompiled Functional model named `resnet{depth}`.

    Raises:
        ValueError: `depth` is not one of 20, 32, 56, or `width`/`num_classes` is not positive.
    """
    if depth not in RESNET_DEPTHS:
        raise ValueError(
            f"Invalid ResNet depth. Expected one of {list(RESNET_DEPTHS)} "
            f"(depth = 6n + 2). Received: depth={depth}"
        )
    _check_positive(width=width, num_classes=num_classes)
    blocks_per_stage = (depth - 2) // 6

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = _conv_bn(inputs, width, 3, 1, "stem", bn_momentum, relu=True)
    for stage in range(1, 4):
        filters = width * 2 ** (stage - 1)
        for block in range(1, blocks_per_stage + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, stride, f"stage{stage}_block{block}", bn_momentum)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def _basic_block(x, filters: int, stride: int, name: str, bn_momentum: float):
    """Two 3x3 conv-BN pairs plus a shortcut (projected when the shape changes)."""
    shortcut = x
    y = _conv_bn(x, filters, 3, stride, name, bn_momentum, relu=True, suffix="1")
    y = _conv_bn(y, filters, 3, 1, name, bn_momentum, relu=False, suffix="2")
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters, 1, strides=stride, use_bias=False,
            kernel_initializer="he_normal", name=f"{name}_shortcut_conv",
        )(x)
        shortcut = layers.BatchNormalization(
            momentum=bn_momentum, name=f"{name}_shortcut_bn"
        )(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def _conv_bn(
    x, filters: int, kernel: int, stride: int, name: str, bn_momentum: float,
    relu: bool, suffix: str = "",
):
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=f"{name}_conv{suffix}",
    )(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{suffix}")(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu{suffix}")(x)
    return x


# (filters, stride) of each depthwise-separable block, as in MobileNet v1 but
# with the first downsampling left out: 32x32 inputs keep resolution at the stem.
MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))


def mobilenet_style(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    alpha: float = 1.0,
    blocks: Sequence[tuple[int, int]] = MOBILENET_BLOCKS,
    stem_filters: int = 32,
    bn_momentum: float = BN_MOMENTUM,
) -> keras.Model:
    """MobileNet-v1-style network of depthwise-separable blocks (Howard et al. 2017).

    A 3x3 stem conv-BN-ReLU6, then per block: DepthwiseConv2D 3x3 → BN → ReLU6 →
    1x1 Conv2D → BN → ReLU6. Global average pooling and a softmax Dense layer close
    the network. Layers are named `block3_dw`, `block3_dw_bn`, `block3_pw`, ...

    Args:
        input_shape: Per-sample input shape (height, width, channels).
        num_classes: Number of output classes.
        alpha: Width multiplier applied to every layer's filters (rounded to a
            multiple of 8, at least 8).
        blocks: (filters, stride) of each depthwise-separable block, before `alpha`.
        stem_filters: Filters of the stem convolution, before `alpha`.
        bn_momentum: Momentum of the BatchNormalization moving statistics.

    Returns:
        An uncompiled Functional model named `mobilenet`.

    Raises:
        ValueError: `alpha`, `num_classes` or a block's filters/stride is not positive.
    """
    _check_positive(alpha=alpha, num_classes=num_classes, stem_filters=stem_filters)
    for filters, stride in blocks:
        _check_positive(block_filters=filters, block_stride=stride)

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = layers.Conv2D(
        _scaled(stem_filters, alpha), 3, padding="same", use_bias=False, name="stem_conv"
    )(inputs)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(max_value=6.0, name="stem_relu")(x)
    for index, (filters, stride) in enumerate(blocks, start=1):
        name = f"block{index}"
        x = layers.DepthwiseConv2D(
            3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw"
        )(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_dw_bn")(x)
        x = layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")(x)
        x = layers.Conv2D(_scaled(filters, alpha), 1, use_bias=False, name=f"{name}_pw")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_pw_bn")(x)
        x = layers.ReLU(max_value=6.0, name=f"{name}_pw_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="mobilenet")


def _scaled(filters: int, alpha: float) -> int:
    return max(8, int(filters * alpha + 4) // 8 * 8)


def temporal_cnn(
    input_shape: Sequence[int] = (128, 3),
    num_classes: int = 6,
    filters: Sequence[int] = (32, 64, 64, 128),
    kernel_sizes: Sequence[int] = (7, 5, 5, 3),
    pool_every: int = 2,
    bn_momentum: float = BN_MOMENTUM,
) -> keras.Model:
    """1-D temporal CNN for sensor time series such as human-activity recognition.

    A stack of Conv1D → BN → ReLU layers, with MaxPooling1D(2) after every
    `pool_every` convolutions (except after the last), then global average pooling
    over time and a softmax Dense layer. Layers are named `conv1`, `bn1`, `relu1`,
    `pool1`, ..., `predictions`.

    Args:
        input_shape: Per-sample input shape (timesteps, channels).
        num_classes: Number of output classes.
        filters: Filters of each Conv1D layer.
        kernel_sizes: Kernel size of each Conv1D layer (same length as `filters`).
        pool_every: Insert a max pooling after this many convolutions.
        bn_momentum: Momentum of the BatchNormalization moving statistics.

    Returns:
        An uncompiled Functional model named `temporal_cnn`.

    Raises:
        ValueError: `filters` and `kernel_sizes` differ in length, or a size is not positive.
    """
    if len(filters) != len(kernel_sizes) or not filters:
        raise ValueError(
            "Expected `filters` and `kernel_sizes` of the same non-zero length. "
            f"Received: filters={list(filters)}, kernel_sizes={list(kernel_sizes)}"
        )
    _check_positive(num_classes=num_classes, pool_every=pool_every)

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = inputs
    for index, (count, kernel) in enumerate(zip(filters, kernel_sizes), start=1):
        _check_positive(filters=count, kernel_size=kernel)
        x = layers.Conv1D(count, kernel, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{index}")(x)
        x = layers.ReLU(name=f"relu{index}")(x)
        if index % pool_every == 0 and index < len(filters):
            x = layers.MaxPooling1D(2, name=f"pool{index // pool_every}")(x)
    x = layers.GlobalAveragePooling1D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="temporal_cnn")


def vgg_style(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    widths: Sequence[int] = (32, 64, 128),
    convs_per_stage: int = 2,
    dense_units: int = 256,
    batch_norm: bool = False,
    bn_momentum: float = BN_MOMENTUM,
) -> keras.Model:
    """VGG-style network (Simonyan & Zisserman 2015): 3x3 conv stacks and max pooling.

    Each stage is `convs_per_stage` 3x3 Conv2D + ReLU layers (with bias; with BN
    between them when `batch_norm`), then MaxPooling2D(2). The head is Flatten →
    Dense(`dense_units`, ReLU) → Dense(softmax): the large Dense layer is the
    classic target of low-rank factorization. Layers are named `stage2_conv1`,
    `stage2_pool`, `fc1`, `predictions`.

    Args:
        input_shape: Per-sample input shape (height, width, channels).
        num_classes: Number of output classes.
        widths: Filters of each stage.
        convs_per_stage: Convolutions per stage.
        dense_units: Units of the hidden Dense layer.
        batch_norm: Insert BatchNormalization after each convolution.
        bn_momentum: Momentum of the BatchNormalization moving statistics.

    Returns:
        An uncompiled Functional model named `vgg`.

    Raises:
        ValueError: `widths` is empty, or a size is not positive.
    """
    if not widths:
        raise ValueError("Expected at least one stage width. Received: widths=()")
    _check_positive(
        num_classes=num_classes, convs_per_stage=convs_per_stage, dense_units=dense_units
    )
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = inputs
    for stage, width in enumerate(widths, start=1):
        _check_positive(width=width)
        for conv in range(1, convs_per_stage + 1):
            name = f"stage{stage}_conv{conv}"
            x = layers.Conv2D(
                width, 3, padding="same", use_bias=not batch_norm,
                kernel_initializer="he_normal", name=name,
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(
                    momentum=bn_momentum, name=f"stage{stage}_bn{conv}"
                )(x)
            x = layers.ReLU(name=f"stage{stage}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="vgg")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"Expected `{name}` > 0. Received: {name}={value}")


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "resnet20": functools.partial(resnet_cifar, depth=20),
    "resnet32": functools.partial(resnet_cifar, depth=32),
    "resnet56": functools.partial(resnet_cifar, depth=56),
    "mobilenet": mobilenet_style,
    "temporal_cnn": temporal_cnn,
    "vgg": vgg_style,
}
"""Builders by name; each accepts `input_shape` and `num_classes` keywords."""
