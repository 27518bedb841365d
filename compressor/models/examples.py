"""Built-in examples: small trained models with their data, made offline in minutes.

`build_example` trains one of `EXAMPLES` and writes, each atomically:

    DIR/model.keras   the trained model: plain Keras layers, uncompiled (no optimizer
                      state); it loads with `keras.saving.load_model` without this
                      package.
    DIR/train.npz     arrays `x` (float32) and `y` (int64 class labels)
    DIR/val.npz
    DIR/test.npz      the held-out split the reported accuracy is measured on

A run is deterministic given its seed: the same seed gives identical data and
identical weights. To get there it seeds Python, NumPy, TensorFlow and Keras (the
seeds stay set) and turns on TensorFlow's op determinism while it trains.

Importing this module does not import TensorFlow; `build_example` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from compressor.errors import CompressorError
from compressor.io.atomic import atomic_path, ensure_dir
from compressor.models.splits import SPLITS, Splits

EpochCallback = Callable[[int, int, Mapping[str, float]], None]
"""Called after each epoch with (epoch starting at 1, total epochs, metrics)."""
StageCallback = Callable[[str], None]
"""Called with a short description when a stage of the build begins."""


def _digits_data(seed: int, limit: Optional[int], source: Optional[Path]) -> Splits:
    from compressor.models.digits import make_digit_splits

    return make_digit_splits(seed=seed, limit=limit)


def _har_data(seed: int, limit: Optional[int], source: Optional[Path]) -> Splits:
    from compressor.models.har import make_har_splits

    return make_har_splits(seed=seed, limit=limit)


def _fashion_data(seed: int, limit: Optional[int], source: Optional[Path]) -> Splits:
    from compressor.models.fashion import make_fashion_splits

    return make_fashion_splits(seed=seed, limit=limit, source=source)


@dataclass(frozen=True)
class ExampleSpec:
    """How one built-in example is made.

    Attributes:
        name: Registry name.
        description: One line for help texts.
        architecture: Key of `compressor.models.zoo.ARCHITECTURES`.
        model_kwargs: Keyword arguments of that builder.
        make_data: (seed, limit, source) -> Splits.
        epochs: Default number of epochs.
        batch_size: Training batch size.
        learning_rate: Initial Adam learning rate (cosine-decayed to 0 over the run).
        reads_files: Whether the data is read from files (`source`) rather than made.
    """

    name: str
    description: str
    architecture: str
    model_kwargs: Mapping[str, Any]
    make_data: Callable[[int, Optional[int], Optional[Path]], Splits]
    epochs: int
    batch_size: int = 64
    learning_rate: float = 2e-3
    reads_files: bool = False


EXAMPLES: dict[str, ExampleSpec] = {
    spec.name: spec
    for spec in (
        ExampleSpec(
            name="digits-resnet20",
            description="ResNet-20 on augmented 32x32 scikit-learn digits (10 classes)",
            architecture="resnet20",
            model_kwargs={"input_shape": (32, 32, 1), "num_classes": 10},
            make_data=_digits_data,
            epochs=6,
        ),
        ExampleSpec(
            name="digits-mobilenet",
            description="MobileNet-style (alpha 0.5) on augmented 32x32 scikit-learn digits",
            architecture="mobilenet",
            model_kwargs={"input_shape": (32, 32, 1), "num_classes": 10, "alpha": 0.5},
            make_data=_digits_data,
            epochs=8,
            # At 2e-3 it memorizes the training copies before it generalizes (val ~40%).
            learning_rate=1e-2,
        ),
        ExampleSpec(
            name="har-tcn",
            description="1-D temporal CNN on synthetic 3-axis accelerometer activities (6 classes)",
            architecture="temporal_cnn",
            model_kwargs={"input_shape": (128, 3), "num_classes": 6},
            make_data=_har_data,
            epochs=15,
        ),
        ExampleSpec(
            name="fashion-resnet20",
            description="ResNet-20 on Fashion-MNIST (28x28, official splits; needs the idx files)",
            architecture="resnet20",
            model_kwargs={"input_shape": (28, 28, 1), "num_classes": 10},
            make_data=_fashion_data,
            epochs=4,
            batch_size=128,
            reads_files=True,
        ),
        ExampleSpec(
            name="fashion-mobilenet",
            description="MobileNet-style (alpha 1) on Fashion-MNIST (28x28, official splits; needs the idx files)",
            architecture="mobilenet",
            model_kwargs={"input_shape": (28, 28, 1), "num_classes": 10, "alpha": 1.0},
            make_data=_fashion_data,
            epochs=4,
            batch_size=128,
            reads_files=True,
        ),
    )
}


@dataclass
class ExampleResult:
    """What `build_example` produced.

    Attributes:
        name: The example.
        architecture: Builder name in `compressor.models.zoo.ARCHITECTURES`.
        out_dir: Folder the files were written to.
        files: Path of each file written: "model", "train", "val", "test".
        bytes: Size of each file, same keys.
        samples: Number of samples per split.
        input_shape: Per-sample input shape.
        num_classes: Number of classes.
        params: Parameter count of the model.
        seed: Seed of the run.
        epochs: Epochs trained.
        val_accuracy: Accuracy on the validation split after training.
        test_accuracy: Accuracy on the test split.
        train_seconds: Wall-clock time of `fit` alone.
    """

    name: str
    architecture: str
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    input_shape: list[int] = field(default_factory=list)
    num_classes: int = 0
    params: int = 0
    seed: int = 0
    epochs: int = 0
    val_accuracy: float = 0.0
    test_accuracy: float = 0.0
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return asdict(self)


def get_example(name: str) -> ExampleSpec:
    """Look up a built-in example by name.

    Raises:
        CompressorError: There is no example with that name.
    """
    try:
        return EXAMPLES[name]
    except KeyError:
        raise CompressorError(
            f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}"
        ) from None


def check_example(name: str, source: Optional[Path | str] = None) -> ExampleSpec:
    """The example, once its data can be had: refuses a `source` it would not read, and missing data files.

    Cheap (no TensorFlow, no training): the CLI calls it before anything starts.

    Raises:
        CompressorError: One line saying what is wrong and what to do.
    """
    spec = get_example(name)
    if spec.reads_files:
        from compressor.models.fashion import find_source

        find_source(source)
    elif source is not None:
        raise CompressorError(f"example {name} makes its own data; a source folder is only read by "
                              + ", ".join(n for n, s in EXAMPLES.items() if s.reads_files))
    return spec


def build_example(
    name: str,
    out_dir: Path | str,
    seed: int = 0,
    epochs: Optional[int] = None,
    limit: Optional[int] = None,
    on_epoch: Optional[EpochCallback] = None,
    on_stage: Optional[StageCallback] = None,
    source: Optional[Path | str] = None,
) -> ExampleResult:
    """Generate an example's data, train its model, and write both to `out_dir`.

    Args:
        name: One of `EXAMPLES`.
        out_dir: Output folder (created if missing).
        seed: Seed of the data and of the training.
        epochs: Epochs to train; None means the example's default.
        limit: Train on at most this many samples (for quick runs); None uses all.
        on_epoch: Progress callback after each epoch.
        on_stage: Progress callback at the start of each stage.
        source: Folder the data files are read from, for examples that read files
            (`ExampleSpec.reads_files`); None: their default location.

    Returns:
        The paths, sizes, sample counts and accuracies of what was written.

    Raises:
        CompressorError: Unknown example, invalid `epochs`/`limit`, a `source` for
            an example that makes its own data, missing data files, or an output
            folder that cannot be written.
    """
    spec = check_example(name, source)
    epochs = spec.epochs if epochs is None else epochs
    for label, value in (("epochs", epochs), ("limit", limit)):
        if value is not None and value < 1:
            raise CompressorError(f"{label} must be at least 1, got {value}")
    out = ensure_dir(Path(out_dir))
    stage = on_stage or (lambda _: None)

    from compressor.models.training import deterministic, train_classifier

    stage("generating data")
    data = spec.make_data(seed, limit, None if source is None else Path(source))
    files = {split: out / f"{split}.npz" for split in SPLITS}
    for split, (x, y) in data.items():
        _save_npz(files[split], x, y)

    stage("training")
    with deterministic(seed):
        trained = train_classifier(spec, data, epochs, on_epoch)
    stage("saving model")
    files["model"] = out / "model.keras"
    with atomic_path(files["model"]) as tmp:
        trained.model.save(tmp)

    files = {key: files[key] for key in ("model", *SPLITS)}
    return ExampleResult(
        name=spec.name,
        architecture=spec.architecture,
        out_dir=str(out),
        files={key: str(path) for key, path in files.items()},
        bytes={key: path.stat().st_size for key, path in files.items()},
        samples=data.sizes(),
        input_shape=[int(d) for d in data.train[0].shape[1:]],
        num_classes=int(spec.model_kwargs["num_classes"]),
        params=int(trained.model.count_params()),
        seed=seed,
        epochs=epochs,
        val_accuracy=trained.val_accuracy,
        test_accuracy=trained.test_accuracy,
        train_seconds=round(trained.train_seconds, 2),
    )


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, x=x.astype(np.float32), y=y.astype(np.int64))
