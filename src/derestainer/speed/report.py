"""How speed results read: a plain-text summary of one result, a Markdown table of many (docs/performance.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def format_result(res: dict[str, Any]) -> str:
    """A human-readable summary of :func:`~derestainer.speed.run.run_bench`'s result."""
    lines = [
        (f"derestainer bench: {res['model']} ({res['generator']}), {res['mode']}, {res['size']} px, batch {res['batch']}, "
         f"{res['device']} [{res['device_name']}, {res['threads']} threads], torch {res['torch']}"),
        f"GFLOPs/image (forward): {res['gflops_per_image']:.2f}"
        + (f"; training step: {res['train_step_gflops_per_image']:.2f}" if res.get("train_step_gflops_per_image") else "")
        + f"; parameters: {res['params_m']:.2f} M; {res['warmup']} warm-up + {res['iters']} timed rounds",
    ]
    unit = "tiles/s" if res["mode"] == "infer" else "steps/s"
    head = f"{'path':<20} {'images/s median [q1–q3] (min–max)':<40} {unit:>10} {'MP/s':>8} {'peak MB':>9}"
    lines.append(head)
    for name, p in res["paths"].items():
        ips = p["images_per_s"]
        other = p["tiles_per_s"]["median"] if res["mode"] == "infer" else ips["median"] / res["batch"]
        lines.append(
            f"{name:<20} {_fmt(ips['median'])} [{_fmt(ips['q1'])}–{_fmt(ips['q3'])}] ({_fmt(ips['min'])}–{_fmt(ips['max'])})".ljust(61)
            + f" {_fmt(other):>10} {_fmt(p['megapixels_per_s']['median']):>8} {p['peak_memory_mb']:>9.0f}"
        )
    for key, r in res["ratios"].items():
        lines.append(f"ratio {key}: {r['speedup_of_medians']:.2f}x (paired median {r['speedup_paired_median']:.2f}x)")
    lines.append(f"memory: {res['paths'][next(iter(res['paths']))]['memory_kind']}")
    la = res.get("load_average") or [None, None]
    if la[0] is not None:
        lines.append(f"1-min load average before/after: {la[0]}/{la[1]} (other work on the machine skews CPU timings)")
    for n in res.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def summary_table(files: Sequence[Path | str]) -> str:
    """A Markdown table of ``derestainer bench --json`` results: one row per path (docs/performance.md layout)."""
    rows = ["| model | mode | px | batch | path | images/s median [q1–q3] | ratio vs eager | GFLOPs/img | peak MB | device | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        res = json.loads(Path(f).read_text())
        for name, p in res["paths"].items():
            ips = p["images_per_s"]
            base = name.replace("optimized", "eager")
            r = res["ratios"].get(f"{name}/{base}")
            ratio = f"{r['speedup_of_medians']:.2f}x" if r else ("1" if base == name else "")
            rows.append(
                f"| {res['model']} | {res['mode']} | {res['size']} | {res['batch']} | {name} | "
                f"{_fmt(ips['median'])} [{_fmt(ips['q1'])}–{_fmt(ips['q3'])}] | {ratio} | {res['gflops_per_image']:.3g} | "
                f"{p['peak_memory_mb']:.0f} | {res['device_name']} | `{res.get('command') or ''}` |"
            )
    return "\n".join(rows)
