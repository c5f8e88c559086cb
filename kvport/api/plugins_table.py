"""`kvport plugins`: what is installed, what is available here and why not, as a table or JSON.

One entry per plugin (loaded, refused, failed to load, or left out by KVPORT_PLUGINS) with
its distribution and version, the plugin API range it declares, the devices it provides
(available here or the reason why not) and the attention backends it registers.
"""
from __future__ import annotations

import json

from kvport.platforms.api_version import PLUGIN_API_VERSION
from kvport.platforms.records import kvport_version


def _loaded_entry(registry, info) -> dict:
    platforms = []
    for reg in registry.platforms():
        if registry.origin(reg) != info:
            continue
        available, reason = registry.availability(reg)
        platforms.append({"name": reg.name, "device": reg.device_type, "priority": reg.priority,
                          "framework": reg.framework, "available": available,
                          "reason": reason})
    backends = [{"name": reg.name, "devices": list(reg.device_types) or ["any"],
                 "framework": reg.framework}
                for reg in registry.attention_backends() if registry.origin(reg) == info]
    models = sorted(f"{reg.architecture} ({reg.framework})" for reg in registry.models()
                    if registry.origin(reg) == info)
    return _entry(info, "loaded", info.api_range, None, platforms, backends, models)


def _entry(info, status: str, api_range, error, platforms=(), backends=(), models=()) -> dict:
    return {"plugin": info.name, "distribution": info.dist_name, "version": info.dist_version,
            "module": info.module, "status": status, "api_range": api_range, "error": error,
            "platforms": list(platforms), "attention_backends": list(backends),
            "models": list(models)}


def collect_plugins(registry) -> dict:
    """Everything `kvport plugins` shows, as plain data (the --json output)."""
    plugins = [_loaded_entry(registry, info) for info in registry.plugins()]
    plugins += [_entry(r.info, "refused", r.declared, r.message)
                for r in registry.refused_plugins]
    plugins += [_entry(f.info, "failed", None, "failed to load:\n" + f.traceback_text)
                for f in registry.load_failures]
    plugins += [_entry(info, "excluded", None, "not in KVPORT_PLUGINS")
                for info in registry.excluded_plugins]
    return {"kvport_version": kvport_version(), "plugin_api_version": PLUGIN_API_VERSION,
            "plugins": plugins}


def table_rows(data: dict) -> list[tuple[list[str], list[str]]]:
    """(cells, notes) per row: one row per platform of a plugin, or one for the plugin."""
    rows = []
    for plugin in data["plugins"]:
        package = " ".join(p for p in (plugin["distribution"], plugin["version"]) if p) or "-"
        backends = ", ".join(f"{b['name']} ({'/'.join(b['devices'])})"
                             for b in plugin["attention_backends"]) or "-"
        head = [plugin["plugin"], package, plugin["api_range"] or "-"]
        if plugin["status"] != "loaded":
            first_line = (plugin["error"] or "").strip().splitlines()[:1]
            rows.append((head + ["-", plugin["status"], backends],
                         [f"why: {plugin['error']}"] if first_line else []))
            continue
        if not plugin["platforms"]:
            rows.append((head + ["-", "-", backends], []))
        for platform in plugin["platforms"]:
            status = "yes" if platform["available"] else "no"
            notes = [] if platform["available"] else [
                f"why not: {platform['reason'] or '(the plugin gave no reason)'}"]
            rows.append((head + [platform["device"], status, backends], notes))
    return rows


def render_table(data: dict) -> str:
    header = ["PLUGIN", "DISTRIBUTION", "API RANGE", "DEVICE", "AVAILABLE",
              "ATTENTION BACKENDS"]
    rows = table_rows(data)
    widths = [max(len(header[i]), *(len(cells[i]) for cells, _ in rows)) if rows
              else len(header[i]) for i in range(len(header) - 1)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]

    out = [f"kvport {data['kvport_version'] or '(not installed)'}, plugin API "
           f"{data['plugin_api_version']}", "", line(header)]
    indent = " " * (sum(widths[:3]) + 6)
    for cells, notes in rows:
        out.append(line(cells))
        out += [indent + note.replace("\n", "\n" + indent) for note in notes]
    return "\n".join(out)


def print_plugins(as_json: bool = False, registry=None) -> int:
    from kvport.platforms.registry import PluginRegistry

    data = collect_plugins(registry or PluginRegistry())
    print(json.dumps(data, indent=2) if as_json else render_table(data))
    return 0
