"""Errors a user can act on.

Every error raised for bad input names the offending item (a path, an id, a column,
a split) and says what to do about it. Both core and defs raise these; nothing
catches them silently.
"""

from __future__ import annotations


class RoadworkError(Exception):
    """Base class for every error this project raises on purpose."""


class BadInputError(RoadworkError, ValueError):
    """Input data (an image, a label, a table, a column) cannot be used as given."""


class InsufficientDataError(BadInputError):
    """A split has too few items (or too few of one class) for what is asked of it."""


class ArtifactIntegrityError(RoadworkError):
    """An artifact on disk does not match its schema, its hash, or is missing."""


class LeakageError(RoadworkError):
    """An asset read, or could read, a split partition its policy forbids."""
