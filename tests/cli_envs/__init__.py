"""Environments for the command-line tests, importable as modules that register them (``MODULE:ENV_ID``)."""
