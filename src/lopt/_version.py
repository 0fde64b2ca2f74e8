"""The package version (read by lopt and its config files)."""

__version__ = "0.1.0"
