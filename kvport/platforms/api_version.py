"""The plugin API version, the range each plugin declares, and the check between them.

Policy (docs/plugins.md, "Version policy"):

* ``PLUGIN_API_VERSION`` is "MAJOR.MINOR". A minor bump only adds: new hooks, new keyword
  arguments to hooks or to ``register(...)`` callbacks (always with defaults), new optional
  methods on the interfaces (with a default implementation). Hooks only ever gain arguments;
  pluggy passes an implementation only the arguments it names, so old plugins keep working.
* A major bump is anything else (a removed or renamed hook, argument or method, a changed
  meaning). Plugins built for another major are refused.
* Every plugin's entry-point object (usually its module) declares the versions it supports::

      KVPORT_PLUGIN_API = ">=1.0,<2"      # needs 1.0's features, works with every 1.x

  The value is a PEP 440 specifier set. The registry refuses a plugin that declares nothing,
  declares something unparsable, or declares a range without ``PLUGIN_API_VERSION``; the
  message names both versions and what to install.
"""
from __future__ import annotations

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

PLUGIN_API_VERSION = "1.0"
API_DECLARATION = "KVPORT_PLUGIN_API"
# What a new plugin for this kvport declares.
RECOMMENDED_RANGE = f">={PLUGIN_API_VERSION},<{Version(PLUGIN_API_VERSION).major + 1}"

# Plugin API major -> the first kvport release that provides it (for "install ..." advice).
# Add a row with every major bump.
API_MAJOR_RELEASES: dict[int, str] = {1: "0.1.0"}


def parse_range(declared: object) -> SpecifierSet:
    """The declared range as a SpecifierSet; ValueError says what is wrong with it."""
    if not isinstance(declared, str) or not declared.strip():
        raise ValueError(f"{API_DECLARATION} must be a non-empty string such as "
                         f"{RECOMMENDED_RANGE!r}, got {declared!r}")
    try:
        return SpecifierSet(declared)
    except InvalidSpecifier as exc:
        raise ValueError(f"{API_DECLARATION} = {declared!r} is not a version range "
                         f"(PEP 440, e.g. {RECOMMENDED_RANGE!r}): {exc}") from None


def supports(declared: str, version: str = PLUGIN_API_VERSION) -> bool:
    """Whether a plugin declaring `declared` may load under plugin API `version`."""
    return parse_range(declared).contains(version, prereleases=True)


def _probe_versions(current: Version) -> list[Version]:
    """API versions around `current` to find which side of it a declared range lies on."""
    return [Version(f"{major}.{minor}") for major in range(0, current.major + 6)
            for minor in range(0, 30)]


def _kvport_pin_for_major(major: int) -> str | None:
    """A pip requirement for a kvport release that provides plugin API `major`.x."""
    first = API_MAJOR_RELEASES.get(major)
    if first is None:
        return None
    following = API_MAJOR_RELEASES.get(major + 1)
    return f"kvport>={first},<{following}" if following else f"kvport>={first}"


def incompatibility_advice(declared: str, package: str,
                           current: str = PLUGIN_API_VERSION) -> str:
    """What to install when a plugin declaring `declared` cannot load under `current`."""
    spec = parse_range(declared)
    now = Version(current)
    wanted = [v for v in _probe_versions(now) if spec.contains(v, prereleases=True)]
    newer = [v for v in wanted if v > now]
    older = [v for v in wanted if v < now]
    if newer:
        return (f"{package} is built for a newer kvport: upgrade kvport "
                f"(`pip install -U kvport`) to a release providing plugin API "
                f"{newer[0].major}.{newer[0].minor} or later, or install a release of "
                f"{package} that supports plugin API {current}")
    if older:
        pin = _kvport_pin_for_major(older[-1].major)
        downgrade = (f", or keep this {package} and install `pip install '{pin}'`"
                     if pin else "")
        return (f"{package} is built for an older plugin API: upgrade it "
                f"(`pip install -U {package}`) to a release that supports plugin API "
                f"{current}{downgrade}")
    return (f"the range {declared!r} contains no plugin API version at all (a bug in "
            f"{package}); a plugin for this kvport declares {RECOMMENDED_RANGE!r}")


def refusal_message(declared: object, describe: str, package: str, module: str,
                    kvport_version: str | None, current: str = PLUGIN_API_VERSION) -> str | None:
    """None when a plugin declaring `declared` may load; otherwise why not and what to do.

    describe: the plugin, e.g. "plugin 'cuda' (kvport-cuda 1.2.0)"; package: what a user
    would pip install; module: where the declaration belongs.
    """
    if declared is None:
        return (f"{describe} declares no supported plugin API range, so kvport cannot tell "
                f"whether it fits this kvport (plugin API {current}). Its entry-point module "
                f"{module} must set {API_DECLARATION} = {RECOMMENDED_RANGE!r} (the plugin API "
                f"versions it supports); install a release of {package} that declares it, "
                f"or report this to its authors")
    try:
        if supports(declared, current):   # type: ignore[arg-type]
            return None
    except ValueError as exc:
        return (f"{describe} declares an invalid plugin API range: {exc}. This is a bug in "
                f"{package} ({module}); report it to its authors")
    return (f"{describe} supports plugin API {declared}, but this kvport"
            f"{' ' + kvport_version if kvport_version else ''} provides plugin API {current}: "
            + incompatibility_advice(declared, package, current))  # type: ignore[arg-type]
