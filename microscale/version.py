"""The package version, importable from any layer (the package's __init__ sits at the top)."""

__version__ = "0.1.0"
