"""`python -m compressor` runs the CLI."""

from compressor.cli.app import main

main()
