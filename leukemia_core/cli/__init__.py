"""The ``leukemia-core`` command line: one entry point (``main``), one module per command group."""
from leukemia_core.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
