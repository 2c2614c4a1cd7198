"""Offline batch inference (`edgespec batch`, `edgespec.batch.run`): JSONL records in, JSONL results out,
resumable after any crash, on local worker processes or on a Ray cluster."""

from edgespec.apps.batch.generate import BatchSettings
from edgespec.apps.batch.jobs import run
from edgespec.apps.batch.records import InputError

__all__ = ["BatchSettings", "InputError", "run"]
