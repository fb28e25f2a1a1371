"""serve: an HTTP server over the INT4 checkpoint (embedded engine), or SGLang on GPUs.

Reads:  CKPT, an `int4-checkpoint` (or, with --weights fp32/bf16, any checkpoint run densely).
Writes: nothing; serves until interrupted.

Embedded backend: SGLang's native routes (/generate, /health_generate, /flush_cache,
/abort_request, /pause_generation, /continue_generation, /update_weights_from_disk, server and
model info) and the OpenAI routes (/v1/completions, /v1/chat/completions, /v1/models): the app is
qatctl/server.py, request schemas qatctl/api.py. Continuous batching: requests join the running
batch at the next decode step and leave when they finish (--max-batch running at once); identical
prompts are prefilled once (prefix cache, flushed by /flush_cache and weight updates). The engine
is batch-invariant, so a request's tokens and logprobs do not depend on what else runs.

    qatctl serve runs/demo/int4 --port 30000
    qatctl serve runs/demo/int4 --backend sglang -- --tp-size 2     # GPU machine with sglang
"""


import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qatctl.errors import QatctlError

log = logging.getLogger("qatctl.serve")


@dataclass(frozen=True)
class ServeConfig:
    ckpt: Path  # an int4-checkpoint
    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = 30000
    api_key: str | None = None  # require `Authorization: Bearer KEY` (all routes but /health)
    backend: str = "embedded"  # embedded (this process, CPU int4 kernel) or sglang (GPU)
    weights: str = "int4"  # embedded: int4 (4-bit kernel) or fp32 / bf16 dense baselines
    device: str = "auto"  # embedded: auto (CUDA when present), cpu or cuda
    max_batch: int = 32  # requests running at once (continuous batching); more wait in a queue
    threads: int | None = None  # torch threads for the engine (default: torch's)
    model_name: str | None = None  # the id /v1/models reports (default: the folder name)
    sglang_args: tuple[str, ...] = ()  # extra flags passed to sglang.launch_server


# ---------------------------------------------------------------- SGLang backend

def sglang_command(config: ServeConfig, python: str = "python") -> list[str]:
    """The sglang.launch_server command line for a compressed-tensors W4A16 checkpoint."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(config.ckpt), "--host", config.host,
           "--port", str(config.port), "--quantization", "compressed-tensors", "--dtype", "bfloat16",
           "--served-model-name", config.model_name or Path(config.ckpt).name]
    if config.api_key:
        cmd += ["--api-key", config.api_key]
    return cmd + list(config.sglang_args)


def check_sglang_available() -> None:
    import importlib.util
    import shutil

    if importlib.util.find_spec("sglang") is None:
        raise QatctlError("--backend sglang: sglang is not installed (pip install 'qatctl[gpu]' on a GPU machine); "
                          "the embedded backend serves on CPU")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = shutil.which("nvidia-smi") is not None
    if not has_gpu:
        raise QatctlError("--backend sglang: no GPU is available; SGLang needs one (use --backend embedded on CPU)")


def run_sglang(config: ServeConfig) -> dict:
    import signal
    import subprocess
    import sys
    import urllib.request

    from qatctl.ui import console

    check_sglang_available()
    cmd = sglang_command(config, python=sys.executable)
    console.print("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    url = f"http://{config.host}:{config.port}/health"
    deadline = time.time() + 1800
    while proc.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    console.print(f"SGLang is serving {config.ckpt} at http://{config.host}:{config.port}")
                    break
        except OSError:
            time.sleep(2)
    code = proc.wait()
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise QatctlError(f"sglang.launch_server exited with code {code}", exit_code=1)
    return {"backend": "sglang", "exit_code": code}


# ---------------------------------------------------------------- entry point

def _validate(config: ServeConfig) -> None:
    if config.backend not in ("embedded", "sglang"):
        raise QatctlError(f"--backend {config.backend!r}: expected embedded or sglang")
    if config.weights not in ("int4", "fp32", "bf16"):
        raise QatctlError(f"--weights {config.weights!r}: expected int4, fp32 or bf16")
    if config.device not in ("auto", "cpu", "cuda"):
        raise QatctlError(f"--device {config.device!r}: expected auto, cpu or cuda")
    if not 0 < config.port < 65536:
        raise QatctlError(f"--port {config.port}: expected 1-65535")
    if config.max_batch < 1:
        raise QatctlError(f"--max-batch {config.max_batch}: must be >= 1")


def run(config: ServeConfig) -> dict:
    from qatctl.artifacts import read_artifact

    _validate(config)
    kinds = "int4-checkpoint" if config.weights == "int4" else ("int4-checkpoint", "qat-checkpoint")
    read_artifact(config.ckpt, kinds)
    if config.backend == "sglang":
        return run_sglang(config)

    import torch
    import uvicorn

    from qatctl.engines import load_engine
    from qatctl.server import Server
    from qatctl.ui import console

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = load_engine(config.ckpt, weights=config.weights, device=config.device)
    server = Server(engine, config)
    console.print(f"serving {config.ckpt} on http://{config.host}:{config.port} — engine embedded, kernel "
                  f"{engine.kernel} on {engine.device}, {torch.get_num_threads()} threads, up to {config.max_batch} requests "
                  "running (continuous batching)" + (", API key required" if config.api_key else ""))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(server.app, host=config.host, port=config.port, log_level="warning")
    return {"backend": "embedded", "stopped": True}
