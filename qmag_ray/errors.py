"""Errors shared by the layers: a user error is a ``ValueError`` whose message says what is wrong,
where (redacted URI, flag or YAML key) and how to fix it; commands turn it into exit code 2."""

from __future__ import annotations


class WorkflowError(ValueError):
    """Inputs a workflow cannot use; the message says what and where (a user error)."""
