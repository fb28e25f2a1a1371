"""Write one benchmark's section of docs/benchmarks.md, keeping the other sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def replace_section(text: str, start: str, end: str, body: str) -> str:
    """`text` with the block between the `start` and `end` markers replaced by `body` (appended
    when the markers are not there yet). docs/benchmarks.md and docs/results.md use it."""
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def median(vals: list[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    v = sorted(vals)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def write_section(name: str, lines: list[str]) -> None:
    """Replace (or append) section `name` of docs/benchmarks.md with `lines`, and print it."""
    body = "\n".join(lines)
    print(body)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nWritten by `make bench`; each section by one script in bench/.\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(replace_section(text, f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->", body))
