"""Benchmark: convert-int4 on SmolLM2-135M against the machine's copy bandwidth, in one run.

    python bench/convert.py        (make bench)

Measures, side by side: a plain memory copy of the checkpoint's bytes (the floor any
streaming converter pays), quantize + pack of every target tensor, and the whole stage
(read, quantize, pack, write, digest). Writes docs/benchmarks.md#convert.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, write_section  # noqa: E402
from qatctl.artifacts import read_artifact  # noqa: E402
from qatctl.quant import QuantScheme, pack, quantize  # noqa: E402
from stages import convert_int4, init_qat  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


def best_of(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ckpt = RUNS / "smollm2-init"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    scheme = QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"])
    from safetensors.torch import load_file

    sd = load_file(ckpt / "model.safetensors")
    targets = [v for k, v in sd.items() if convert_int4._target_module(k, v.ndim, scheme)]
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    flat, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)

    copy_s = best_of(lambda: dst.copy_(flat))
    quant_s = best_of(lambda: [quantize(w, scheme) for w in targets])
    qp_s = best_of(lambda: [pack(quantize(w, scheme)[0]) for w in targets])
    tmp = Path(tempfile.mkdtemp())
    stage_s = best_of(lambda: (shutil.rmtree(tmp / "int4", ignore_errors=True),
                               convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=tmp / "int4"))))
    shutil.rmtree(tmp)

    rows = [("memory copy of the checkpoint bytes (preallocated)", copy_s), ("quantize (210 tensors)", quant_s),
            ("quantize + pack", qp_s), ("convert-int4 stage (read, quantize, pack, write, digest)", stage_s)]
    lines = [f"## convert-int4 on SmolLM2-135M ({nbytes / 1e6:.0f} MB BF16)", "",
             f"Machine: {machine()}. Run {datetime.date.today()}; best of 3.", "",
             "| step | seconds | GB/s of BF16 input | × memory copy |", "|---|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {s:.3f} | {nbytes / s / 1e9:.2f} | {s / copy_s:.0f}× |")
    share = qp_s / stage_s
    lines += ["", f"Quantize + pack is {share:.0%} of the stage; the rest is safetensors read/write and the "
              "sha256 of every output file for the manifest. The issue asks for seconds on a 135M model."]
    write_section("convert", lines)


if __name__ == "__main__":
    main()
