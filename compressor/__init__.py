"""compressor: smaller, faster, verified edge artifacts from trained Keras models.

Importing this package is cheap: TensorFlow is imported only by the modules that
need it (loading, analysis, export), never by the CLI entry point or by the
benchmark runtime, which must run on boards without TensorFlow.
"""

__version__ = "0.1.0"
