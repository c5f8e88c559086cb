"""The registry's exceptions. Each message says what went wrong and what to do."""
from __future__ import annotations


class PlatformSelectionError(RuntimeError):
    """No platform could be selected; the message says why and what to do."""


class DuplicateRegistrationError(RuntimeError):
    """Two plugins registered the same platform or attention-backend name."""


class AttentionBackendError(ValueError):
    """An attention backend name is unknown or does not run on the requested device."""


class UnsupportedModelError(ValueError):
    """No registered model implementation for an architecture (and framework)."""


class PluginImportError(ImportError):
    """A dotted path registered by a plugin could not be imported; carries the traceback."""
