"""Write a benchmark's rows into benchmarks/results/<stem>.json, the files `make results` renders.

Each file is one benchmark or sweep:

    {"title": ..., "section": "real" | "demo" | "bench", "order": N, "description": ...,
     "columns": [{"key": ..., "label": ..., "format": ...}, ...], "notes": [...], "source": ...,
     "rows": [{"name": ..., "command": ..., "date": ..., "machine": ..., "metrics": {...}}, ...],
     "last_run": {...}}

A metric is a number, a string, a list (one value per seed), or {"mean": .., "std": .., "per_seed": [..]}.
A rerun replaces the rows of the same name and keeps the others, the file's notes, and each replaced
row's presentation keys (note, highlight, headline). Standard library only; importing it does nothing.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
PRESENTATION = ("note", "highlight", "headline")


def machine() -> str:
    """This machine in a few words, e.g. '2-core Xeon (AMX, AVX512-BF16), no GPU'."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model, flags = "CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "CPU":
                words = value.replace("(R)", "").replace("(TM)", "").split("@")[0].split()
                model = " ".join(w for w in words if w not in ("Intel", "AMD", "CPU", "Processor")) or "CPU"
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    extras = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    cpu = f"{cores}-core {model}" + (f" ({', '.join(extras)})" if extras else "")
    torch = sys.modules.get("torch")  # only when the benchmark imported it
    if torch is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{cpu}, {count} x {torch.cuda.get_device_name(0)}"
    return f"{cpu}, no GPU"


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran `script` (its path from the project root), for the rows it writes."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(script).resolve()
    if path.is_relative_to(ROOT):
        path = path.relative_to(ROOT)
    return shlex.join(["python", str(path), *args])


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std", "per_seed"} of one metric over seeds (std 0 for a single value)."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "per_seed": values}


def row(name: str, cmd: str, metrics: dict, **extra: object) -> dict:
    """One result row, dated today and on this machine."""
    return {"name": name, "command": cmd, "date": datetime.date.today().isoformat(), "machine": machine(),
            "metrics": metrics, **extra}


def write(stem: str, rows: list[dict], *, title: str, columns: list[dict], section: str = "bench",
          last_run: object = None, folder: Path = RESULTS) -> Path:
    """Merge `rows` into folder/<stem>.json (replacing rows of the same name) and return its path."""
    path = folder / f"{stem}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"order": 100, "notes": []}
    old = {r["name"]: r for r in data.get("rows", [])}
    for new in rows:
        for key in PRESENTATION:
            if key in old.get(new["name"], {}) and key not in new:
                new[key] = old[new["name"]][key]
        old[new["name"]] = new
    data.update(title=title, section=section, columns=columns, rows=list(old.values()))
    if last_run is not None:
        data["last_run"] = last_run
    if not any("source" in r for r in data["rows"]):
        data.pop("source", None)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults written to {path}; `make results` updates docs/results.md")
    return path
