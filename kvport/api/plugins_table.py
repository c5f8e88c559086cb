"""`kvport plugins`: what is installed, what is available here, and why not."""
from __future__ import annotations

import json


def collect_plugins(registry) -> list[dict]:
    """One row per registered platform plus one per plugin that failed to load."""
    rows = []
    for reg in registry.platforms():
        origin = registry.origin(reg)
        available, reason = registry.availability(reg)
        backends = [b.name for b in registry.attention_backends(reg.device_type)]
        rows.append({"plugin": origin.name, "distribution": origin.dist_name,
                     "version": origin.dist_version, "platform": reg.name,
                     "device": reg.device_type, "priority": reg.priority,
                     "available": available, "reason": reason,
                     "attention_backends": backends})
    for failure in registry.load_failures:
        rows.append({"plugin": failure.name, "distribution": failure.dist_name,
                     "version": failure.dist_version, "platform": None, "device": None,
                     "priority": None, "available": False,
                     "reason": "failed to load:\n" + failure.traceback_text,
                     "attention_backends": []})
    return rows


def print_plugins(as_json: bool = False, registry=None) -> int:
    from kvport.platforms.registry import PluginRegistry

    rows = collect_plugins(registry or PluginRegistry())
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'device':<8} {'plugin':<22} {'available':<10} attention backends"
    print(header)
    print("-" * len(header))
    for row in rows:
        package = f"{row['distribution']} {row['version'] or ''}".strip()
        status = "yes" if row["available"] else "no"
        print(f"{row['device'] or '?':<8} {package:<22} {status:<10} "
              f"{', '.join(row['attention_backends'])}")
        if not row["available"]:
            print(f"{'':<8} why not: {row['reason']}")
    return 0
