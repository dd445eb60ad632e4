"""Writing evaluation results: CSV + markdown tables, JSON (with per-frame values), contact sheets.

Table layout: one row per (clip, method) plus a ``mean`` row per method (mean of the per-clip
means). Every metric of the protocol has a column; a metric whose model is missing fills its
column with ``absent: <what is needed>`` (CSV) or ``absent`` with the reason in the notes below the
markdown table. Face-based metrics skip frames where no face is found; the notes list how many
frames each mean is based on when some were skipped.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .protocols import EvaluationResult

SCHEMA = "xnemo-eval/1"


def _rows(result: EvaluationResult, markdown: bool) -> tuple[list[str], list[list[str]]]:
    header = ["protocol", "clip", "method", "frames"] + [m.name + (" ↑" if markdown and m.higher_is_better else
                                                                   " ↓" if markdown else "") for m in result.metrics]
    rows = []

    def cells(values):
        out = []
        for status, value in zip(result.metrics, values):
            if not status.available:
                out.append("absent" if markdown else f"absent: {status.absent}")
            elif value is None or not math.isfinite(value):
                out.append("n/a")
            else:
                out.append(_fmt(status.name, value))
        return out

    for clip in result.clips:
        rows.append([result.protocol, clip.clip, clip.method, str(clip.frames)]
                    + cells([clip.mean(m.name) for m in result.metrics]))
    for method in result.methods():
        frames = sum(c.frames for c in result.clips if c.method == method)
        rows.append([result.protocol, "**mean**" if markdown else "mean", method, str(frames)]
                    + cells([result.summary(method, m.name) for m in result.metrics]))
    return header, rows


def _fmt(name: str, value: float) -> str:
    return f"{value:.2f}" if name in ("PSNR", "APD") else f"{value:.4f}"


def write_csv(results: list[EvaluationResult], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        for i, result in enumerate(results):
            header, rows = _rows(result, markdown=False)
            if i:
                writer.writerow([])
            writer.writerow(header)
            writer.writerows(rows)


def markdown_table(result: EvaluationResult) -> str:
    header, rows = _rows(result, markdown=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    for status in result.metrics:
        if status.available:
            notes.append(f"- **{status.name}** ({'higher' if status.higher_is_better else 'lower'} is better): "
                         f"{status.backend}")
        else:
            notes.append(f"- **{status.name}**: absent: {status.absent}")
    skipped = []
    for clip in result.clips:
        for status in result.metrics:
            if status.available and status.name in clip.per_frame and clip.valid(status.name) < clip.frames:
                skipped.append(f"{clip.clip}/{clip.method}/{status.name} {clip.valid(status.name)}/{clip.frames}")
    if skipped:
        notes.append("- frames with a face found (others left out of the mean): " + "; ".join(skipped))
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_markdown(results: list[EvaluationResult], path: Path, title: str = "X-NeMo evaluation",
                   settings: dict | None = None) -> str:
    parts = [f"# {title}\n"]
    if settings:
        parts.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "\n")
    for result in results:
        parts.append(f"## {'Self' if result.protocol == 'self' else 'Cross'}-reenactment\n")
        parts.append(markdown_table(result))
    text = "\n".join(parts)
    path.write_text(text)
    return text


def _json_value(value):
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def write_json(results: list[EvaluationResult], path: Path, settings: dict | None = None) -> None:
    data = {"schema": SCHEMA, "settings": settings or {}, "protocols": []}
    for result in results:
        data["protocols"].append({
            "protocol": result.protocol,
            "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better, "backend": m.backend,
                         "absent": m.absent} for m in result.metrics],
            "summary": {method: {m.name: result.summary(method, m.name) if m.available else None
                                 for m in result.metrics} for method in result.methods()},
            "clips": [{"clip": c.clip, "method": c.method, "frames": c.frames, "info": c.info,
                       "mean": {k: c.mean(k) for k in c.per_frame}, "per_frame": c.per_frame}
                      for c in result.clips],
        })
    path.write_text(json.dumps(_json_value(data), indent=1))


# ------------------------------------------------------------------------------------------ sheets
def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    from PIL import Image

    resample = getattr(Image, "Resampling", Image).LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((cell, cell), resample))


def contact_sheet(rows: dict, path: Path, reference: np.ndarray | None = None, columns: int = 8,
                  cell: int = 128, title: str = "") -> Path:
    """A PNG grid: one labelled row per entry of ``rows`` (name -> frames [F,H,W,3]), ``columns``
    evenly spaced frames, and the reference crop in a leading column."""
    from PIL import Image, ImageDraw

    count = min(len(v) for v in rows.values())
    picks = np.unique(np.linspace(0, count - 1, min(columns, count)).round().astype(int))
    label_w, head_h, pad = 110, 36, 2
    lead = 1 if reference is not None else 0
    width = label_w + (len(picks) + lead) * (cell + pad)
    height = head_h + len(rows) * (cell + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    if reference is not None:
        draw.text((label_w + 2, head_h - 14), "reference", fill=(0, 0, 0))
        sheet.paste(Image.fromarray(_fit(reference, cell)), (label_w, head_h))
    for j, k in enumerate(picks):
        draw.text((label_w + (j + lead) * (cell + pad) + 2, head_h - 14), f"frame {k}", fill=(0, 0, 0))
    for i, (name, frames) in enumerate(rows.items()):
        y = head_h + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill=(0, 0, 0))
        for j, k in enumerate(picks):
            sheet.paste(Image.fromarray(_fit(np.asarray(frames[k]), cell)), (label_w + (j + lead) * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.~" else "_" for ch in name)


def write_sheets(result: EvaluationResult, folder: Path, columns: int = 8) -> list[Path]:
    paths = []
    for name, item in result.media.items():
        model = next((c for c in result.clips if c.clip == name and c.method == "x-nemo"), None)
        scores = "" if model is None else ", ".join(
            f"{k} {model.mean(k):.3f}" for k in model.per_frame if math.isfinite(model.mean(k)))
        paths.append(contact_sheet(item["rows"], folder / f"{result.protocol}_{safe_name(name)}.png",
                                   reference=item.get("reference"), columns=columns,
                                   title=f"{result.protocol}: {name}  {scores}"))
    return paths
