"""The throughput benchmark's outputs: a text table, ``throughput.json`` and a Pillow-drawn ``throughput.png``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from PIL import Image, ImageDraw

from pipelines.stats import chart_font

COLORS = {"engine-only": "#9c9c9c", "ours": "#4e79a7", "peer": "#f28e2b"}


def _label(result: Dict[str, Any]) -> str:
    if result["kind"] == "engine-only":
        return "engine-only (ceiling)"
    if result["kind"] == "ours":
        return "ours"
    mode = result["mode"] if result["mode"] == "default" else f"{result['mode']} N={result['workers']}"
    return f"peer {mode}" + (" *best" if result.get("best") else "")


def _notes(result: Dict[str, Any]) -> str:
    notes: List[str] = []
    if result["kind"] == "engine-only" and result.get("images_per_second"):
        notes.append(f"batch {result['batch_size']}, {result['passes']} pass(es), "
                     f"p50 {result['batch_latency_ms']['p50']} ms/batch")
    if result["kind"] == "ours" and result.get("pipeline_images_per_second") is not None:
        notes.append(f"stats.json {result['pipeline_images_per_second']}/s")
    if result.get("mean_batch_size"):
        notes.append(f"mean batch {result['mean_batch_size']}")
    if result.get("process_seconds"):
        notes.append(f"process {result['process_seconds']:.1f} s")
    cpu = result.get("cpu") or {}
    if cpu.get("own_cpu_cores") is not None:
        notes.append(f"{cpu['own_cpu_cores']:.2f} cores busy")
    if (cpu.get("foreign_cpu_share") or 0) >= 0.02:
        notes.append(f"others {cpu['foreign_cpu_share']:.0%} of CPU")
    if result.get("error"):
        notes.append(f"FAILED: {result['error'][:120]}")
    return ", ".join(notes)


def table(summary: Dict[str, Any]) -> str:
    """The results as a fixed-width text table with settings, ratios, targets, checks and flags."""
    settings = summary["settings"]
    images = settings["images"]
    v = settings["versions"]
    lines = [
        f"Throughput benchmark: {images} JPEGs (seed {settings['seed']}), engine {settings['engine']}, "
        f"batch {settings['batch_size']}, {settings['cores']} cores ({settings['cpu']})",
        f"runner args (ours): {settings['runner_args'] or '(none)'}; peer modes: "
        f"{', '.join(settings['peer_modes']) or '(none)'}, N={settings['peer_workers']}; peer batching: "
        f"{settings['peer_batching']}",
        f"versions: python {v['python']}, apache-beam {v['apache-beam']}, onnxruntime {v['onnxruntime']}, "
        f"numpy {v['numpy']}, pillow {v['pillow']}, scikit-image {v['scikit-image']}",
        "",
        f"{'run':<30} {'images/s':>9} {'wall s':>8} {'scored':>11}  notes",
        f"{'-' * 30} {'-' * 9} {'-' * 8} {'-' * 11}  {'-' * 5}",
    ]
    for r in summary["results"]:
        ips = f"{r['images_per_second']:.1f}" if r.get("images_per_second") else "-"
        secs = f"{r['seconds']:.2f}" if r.get("seconds") else "-"
        scored = f"{r.get('scored', 0)}/{images}" + ("" if r.get("complete") else " !")
        lines.append(f"{_label(r):<30} {ips:>9} {secs:>8} {scored:>11}  {_notes(r)}")
    lines.append("")
    target = summary.get("targets") or {}
    for key, value in summary["ratios"].items():
        text = f"{value:.3f}x" if value is not None else "n/a"
        if key in target:
            met = target["met"][key]
            text += f"   (target on {target['machine']}: >= {target[key]}x, " \
                    f"{'met' if met else 'not met' if met is not None else 'n/a'})"
        lines.append(f"{key:<30} {text}")
    for key, value in summary["checks"].items():
        lines.append(f"{key.replace('_', ' '):<30} {value if value is not None else 'n/a'}")
    ours = next((r for r in summary["results"] if r["kind"] == "ours"), None)
    if ours and ours.get("stats") and ours["stats"].get("stage_share"):
        shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in ours["stats"]["stage_share"].items())
        lines.append(f"{'ours stage share':<30} {shares} (of summed stage time; see stats.json)")
    if summary["flags"]:
        lines.append("")
        lines.extend(f"FLAG: {flag}" for flag in summary["flags"])
    return "\n".join(lines)


def chart(summary: Dict[str, Any]) -> Image.Image:
    """A horizontal bar chart of images/s per run, with the ratios and settings underneath."""
    results = summary["results"]
    settings = summary["settings"]
    width, row_h, top = 1000, 44, 96
    height = top + row_h * len(results) + 150
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title, body, small = chart_font(22), chart_font(16), chart_font(14)
    draw.text((20, 14), f"Images per second, {settings['images']} JPEGs, {settings['cores']} cores",
              fill="black", font=title)
    draw.text((20, 46), f"engine {settings['engine']}, batch {settings['batch_size']}, "
                        f"ours' runner args: {settings['runner_args'] or '(none)'}", fill="#444", font=small)
    draw.text((20, 66), f"{settings['cpu']}; apache-beam {settings['versions']['apache-beam']}, onnxruntime "
                        f"{settings['versions']['onnxruntime']}", fill="#444", font=small)
    left, bar_w = 250, 600
    peak = max([r.get("images_per_second") or 0 for r in results] + [1e-9])
    for row, r in enumerate(results):
        y = top + row * row_h
        draw.text((20, y + 8), _label(r), fill="black", font=body)
        draw.rectangle((left, y, left + bar_w, y + row_h - 12), outline="#ddd")
        value = r.get("images_per_second")
        if value:
            draw.rectangle((left, y, left + max(2, int(bar_w * value / peak)), y + row_h - 12),
                           fill=COLORS[r["kind"]])
        text = f"{value:.1f}" if value else "failed"
        if not r.get("complete"):
            text += f"  ({r.get('scored', 0)}/{settings['images']} scored!)"
        draw.text((left + bar_w + 10, y + 8), text, fill="black" if r.get("complete") else "#c00", font=body)
    y = top + row_h * len(results) + 10
    target = summary.get("targets") or {}
    for key, value in summary["ratios"].items():
        text = f"{key}: {value:.3f}x" if value is not None else f"{key}: n/a"
        if key in target:
            text += f"   (target on {target['machine']}: >= {target[key]}x)"
        draw.text((20, y), text, fill="black", font=body)
        y += 26
    for flag in summary["flags"][:3]:
        draw.text((20, y), f"FLAG: {flag[:120]}", fill="#c00", font=small)
        y += 20
    draw.text((20, height - 26), settings["timing"], fill="#444", font=small)
    return image


def write(summary: Dict[str, Any], directory: str) -> Dict[str, str]:
    """Writes ``throughput.json`` and ``throughput.png`` into ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, "throughput.json"), "png": os.path.join(directory, "throughput.png")}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, paths["json"])
    chart(summary).save(paths["png"])
    return paths
