"""Presenting `bench serve` results: the stdout table, subject/peer ratios, JSON and a plot."""
from __future__ import annotations

import json
import os
from typing import Any


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(points: list[dict[str, Any]]) -> str:
    """One line per (concurrency, server), in run order."""
    header = (f"{'server':<18} {'conc':>4} {'reqs':>5} {'fail':>4} {'out tok/s':>9} "
              f"{'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}")
    lines = [header, "-" * len(header)]
    for p in points:
        lines.append(
            f"{p['server']:<18.18} {p['concurrency']:>4} {p['num_requests']:>5} "
            f"{p['failed']:>4} {p['output_throughput']:>9.1f} {p['request_throughput']:>6.2f} "
            f"{_fmt(p['ttft_ms']['p50']):>9} {_fmt(p['ttft_ms']['p99']):>9} "
            f"{_fmt(p['tpot_ms']['p50'], 2):>9} {_fmt(p['tpot_ms']['p99'], 2):>9} "
            f"{_fmt(p['itl_ms']['p50'], 2):>8} {_fmt(p['itl_ms']['p99'], 2):>8}")
    lines.append("(times in ms; TTFT/TPOT/ITL as vLLM's benchmark_serving defines them)")
    return "\n".join(lines)


def compute_ratios(points: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    """subject/peer per concurrency: output throughput (> 1: subject faster) and TPOT p50
    (< 1: subject faster per token)."""
    by_key = {(p["server"], p["concurrency"]): p for p in points}
    ratios = []
    for (server, conc), peer in by_key.items():
        mine = by_key.get((subject, conc))
        if server == subject or mine is None:
            continue
        tput = (mine["output_throughput"] / peer["output_throughput"]
                if peer["output_throughput"] else None)
        a, b = mine["tpot_ms"]["p50"], peer["tpot_ms"]["p50"]
        ratios.append({"subject": subject, "peer": server, "concurrency": conc,
                       "output_throughput_ratio": tput,
                       "tpot_p50_ratio": a / b if a is not None and b else None})
    return ratios


def format_ratios(ratios: list[dict[str, Any]]) -> str:
    if not ratios:
        return ""
    lines = [f"{'ratio':<36} {'conc':>4} {'out tok/s':>10} {'TPOT p50':>9}"]
    for r in ratios:
        label = f"{r['subject']}/{r['peer']}"
        lines.append(f"{label:<36.36} {r['concurrency']:>4} "
                     f"{_fmt(r['output_throughput_ratio'], 2):>10} "
                     f"{_fmt(r['tpot_p50_ratio'], 2):>9}")
    lines.append("(out tok/s ratio > 1 and TPOT ratio < 1 mean the subject is faster)")
    return "\n".join(lines)


def write_json(path: str, document: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def write_plot(path: str, points: list[dict[str, Any]], title: str = "") -> None:
    """Output tok/s and TPOT p50 against concurrency, one line per server."""
    import matplotlib
    matplotlib.use("Agg")   # headless: no display on benchmark machines
    import matplotlib.pyplot as plt

    servers = list(dict.fromkeys(p["server"] for p in points))
    fig, (ax_tput, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in servers:
        mine = sorted((p for p in points if p["server"] == server),
                      key=lambda p: p["concurrency"])
        conc = [p["concurrency"] for p in mine]
        ax_tput.plot(conc, [p["output_throughput"] for p in mine], marker="o", label=server)
        ax_tpot.plot(conc, [p["tpot_ms"]["p50"] for p in mine], marker="o", label=server)
    all_conc = sorted({p["concurrency"] for p in points})
    for ax, ylabel in ((ax_tput, "output tokens/s"), (ax_tpot, "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_conc, [str(c) for c in all_conc])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
