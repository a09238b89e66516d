"""Prefect tasks: thin wrappers, one file per pipeline step, around ``mergeme.pipeline``."""
