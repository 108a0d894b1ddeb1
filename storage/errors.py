"""Errors of persisted stores.  Each message says what was wrong and how to fix it, in one line."""

from __future__ import annotations


class ArtifactError(Exception):
    """An artifact that cannot be used; the message says what and how to fix it."""


class ModelMismatchError(ArtifactError):
    """A store made with another model than the loaded one."""


class StoreBusyError(ArtifactError):
    """Another process is writing the store (one writer per store)."""


class StoreReplacedError(ArtifactError):
    """The store was replaced (a new prefill of the same path) while this process read it."""


class NotAStoreError(ArtifactError):
    """A path that holds something other than an rcengine store, which a prefill must not replace."""
