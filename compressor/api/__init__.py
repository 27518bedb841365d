"""The Python API behind `import compressor`: one module per entry point.

`compressor/__init__.py` declares the public surface (`__all__`) and imports these
modules on first use, so `import compressor` stays cheap. Nothing here imports
TensorFlow at import time; `benchmarking` never does (it runs on target boards).
"""
