"""Platforms and plugins: the hook specification, the Platform interface and the registry.

Importing this package imports neither torch nor jax.
"""
from kvport.platforms.api_version import (
    API_DECLARATION,
    PLUGIN_API_VERSION,
    RECOMMENDED_RANGE,
)
from kvport.platforms.hookspecs import (
    ENTRY_POINT_GROUP,
    PROJECT_NAME,
    AttentionBackendRegistration,
    ModelRegistration,
    PlatformRegistration,
    hookimpl,
    hookspec,
)
from kvport.platforms.interface import Platform
from kvport.platforms.registry import (
    DEVICE_ENV,
    DEVICE_PACKAGES,
    PLUGINS_ENV,
    AttentionBackendError,
    DuplicateRegistrationError,
    PlatformSelectionError,
    PluginImportError,
    PluginInfo,
    PluginLoadFailure,
    PluginRefusal,
    PluginRegistry,
    UnsupportedModelError,
    default_registry,
    import_object,
)

__all__ = [
    "PLUGIN_API_VERSION", "API_DECLARATION", "RECOMMENDED_RANGE",
    "ENTRY_POINT_GROUP", "PROJECT_NAME", "DEVICE_ENV", "DEVICE_PACKAGES", "PLUGINS_ENV",
    "AttentionBackendRegistration", "ModelRegistration", "PlatformRegistration",
    "hookimpl", "hookspec", "Platform",
    "AttentionBackendError", "DuplicateRegistrationError", "PlatformSelectionError",
    "PluginImportError", "UnsupportedModelError",
    "PluginInfo", "PluginLoadFailure", "PluginRefusal", "PluginRegistry",
    "default_registry", "import_object",
]
