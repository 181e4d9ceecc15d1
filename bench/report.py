"""The results of one suite run as a Markdown table and a JSON file."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from bench.common import Result


def _num(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:.4f}" if abs(value) < 0.1 else f"{value:,.3f}" if value < 100 \
        else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def _met(met: Optional[bool]) -> str:
    return "—" if met is None else "met" if met else "**missed**"


def markdown(results: list[Result], knobs: list[dict], meta: dict[str, Any]) -> str:
    lines = [f"# ddptrain benchmark results ({meta['size']} size)", "",
             f"{meta['when']} · {meta['machine']} · torch {meta['torch']} · "
             f"{meta['model']} · {meta['state_mb']} MB of checkpointed state · "
             f"{meta['nproc']} ranks (CPU, gloo) · suite took {meta['minutes']:.1f} min · "
             f"5-min load average before/after {meta['load_avg_before_after']}",
             "",
             "| # | measure | subject | reference | subject value | reference value | "
             "ratio | goal | |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r.key} | {r.measure} | {r.subject} | {r.reference} | "
                     f"{_num(r.subject_value, r.unit)} | {_num(r.reference_value, r.unit)}"
                     f" | {_num(r.ratio)} | {r.goal} | {_met(r.met)} |")
    lines += ["", "Notes:", ""]
    lines += [f"* {r.key}: {r.notes}" for r in results if r.notes]
    if knobs:
        lines += ["", "## Checkpoint knobs (same state, same run)", "",
                  "| knob | what | median s | MB/s | vs direct DCP default |",
                  "|---|---|---:|---:|---:|"]
        for k in knobs:
            lines.append(f"| {k['knob']} | {k['what']} | {_num(k['seconds'])} | "
                         f"{_num(k['mb_per_s'])} | {_num(k['vs_default'])} |")
    return "\n".join(lines) + "\n"


def write(results: list[Result], knobs: list[dict], meta: dict[str, Any], out_dir: str,
          stem: str) -> tuple[str, str]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out_dir``; return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(results, knobs, meta))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": [r.to_dict() for r in results],
                   "knobs": knobs}, f, indent=1)
    return md_path, json_path
