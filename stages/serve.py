"""serve: an HTTP server over the INT4 checkpoint (embedded engine), or SGLang on GPUs.

Reads:  CKPT, an `int4-checkpoint` (or, with --weights fp32/bf16, any checkpoint run densely).
Writes: nothing; serves until interrupted.

Embedded backend: SGLang's native routes (/generate, /health_generate, /flush_cache,
/abort_request, /pause_generation, /continue_generation, /update_weights_from_disk, server and
model info) and the OpenAI routes (/v1/completions, /v1/chat/completions, /v1/models): the app is
qatctl/server.py (routes: qatctl/server_native.py, qatctl/server_openai.py), request schemas
qatctl/api.py. Continuous batching: requests join the running
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

from qatctl.engines.scheduler import Scheduler
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
    api_key_file: Path | None = None  # the key read from a file (first line), kept out of `ps`
    max_batch: int = Scheduler.MAX_BATCH  # requests running at once (continuous batching); more wait in a queue
    max_queue: int = Scheduler.MAX_QUEUE  # requests waiting to join; beyond it a request gets 503
    max_prompts_per_request: int = 1024  # prompts x n in one request
    max_new_tokens_cap: int | None = None  # per-request max_new_tokens limit (default: the model's context)
    max_request_bytes: int = 16 * 2**20  # larger bodies get 413 before they are parsed
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
        cmd += ["--api-key", config.api_key]  # SGLang takes the key only as a flag
    if config.max_batch != ServeConfig.max_batch:
        cmd += ["--max-running-requests", str(config.max_batch)]
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
    from qatctl.checks import fields_at_least

    fields_at_least(config, 1, "max_batch", "max_queue", "max_prompts_per_request", "max_request_bytes",
                    "max_new_tokens_cap")
    if config.backend == "sglang":
        for flag, name in (("--max-queue", "max_queue"), ("--max-prompts-per-request", "max_prompts_per_request"),
                           ("--max-new-tokens-cap", "max_new_tokens_cap"), ("--max-request-bytes", "max_request_bytes"),
                           ("--threads", "threads")):
            if getattr(config, name) != getattr(ServeConfig, name):
                raise QatctlError(f"{flag}: applies to the embedded backend only, not to --backend sglang")
    if config.threads is not None and config.threads < 1:
        raise QatctlError(f"--threads {config.threads}: must be >= 1 (default: the cores this process may use)")
    if config.sglang_args and config.backend != "sglang":
        raise QatctlError(f"unexpected arguments {' '.join(config.sglang_args)!r}: arguments after `--` go to "
                          "sglang.launch_server and need --backend sglang")
    if config.api_key is not None and config.api_key_file is not None:
        raise QatctlError("--api-key and --api-key-file: give one")


def _api_key(config: ServeConfig) -> ServeConfig:
    """The key from --api-key-file, read before anything loads."""
    import dataclasses

    if config.api_key_file is None:
        return config
    try:
        key = config.api_key_file.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QatctlError(f"--api-key-file {config.api_key_file}: cannot read it ({e})") from None
    if not key or not key[0].strip():
        raise QatctlError(f"--api-key-file {config.api_key_file}: the file is empty")
    return dataclasses.replace(config, api_key=key[0].strip(), api_key_file=None)


def _claim_port(config: ServeConfig):
    """Bind the port now, before the model loads: a port in use is an error in a second, not
    after the load. The socket is handed to uvicorn."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise QatctlError(f"--host {config.host} --port {config.port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(config: ServeConfig) -> dict:
    from qatctl.artifacts import read_artifact

    _validate(config)
    config = _api_key(config)
    if not _is_loopback(config.host) and not config.api_key:
        from qatctl.ui import console

        console.print(f"[yellow]warning:[/] --host {config.host} without an API key: anyone who can reach this "
                      "address can generate and replace the served weights (/update_weights_from_disk loads any "
                      "path this user can read); set QATCTL_API_KEY or --api-key-file", highlight=False)
    kinds = "int4-checkpoint" if config.weights == "int4" else ("int4-checkpoint", "qat-checkpoint")
    read_artifact(config.ckpt, kinds)
    if config.backend == "sglang":
        return run_sglang(config)

    import torch
    import uvicorn

    from qatctl.engines import load_engine
    from qatctl.server import Server
    from qatctl.ui import console

    sock = _claim_port(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    engine = load_engine(config.ckpt, weights=config.weights, device=config.device)
    server = Server(engine, config, scheduler_thread=False)  # the engine decodes on this (main) thread
    console.print(f"serving {config.ckpt} on http://{config.host}:{config.port} — engine embedded, kernel "
                  f"{engine.kernel} on {engine.device}, {torch.get_num_threads()} threads, up to {config.max_batch} requests "
                  "running (continuous batching)" + (", API key required" if config.api_key else ""))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import threading

    http = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=60))
    web = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="qatctl-http", daemon=True)
    # SIGTERM (a supervisor stopping the server) shuts down gracefully: no new connections, the
    # requests in flight (a weight update included) are answered, then the process exits 0. The
    # scheduler keeps stepping on this thread until the HTTP thread has finished.
    import signal

    signal.signal(signal.SIGTERM, lambda *_: setattr(http, "should_exit", True))
    web.start()
    try:
        server.scheduler.run(stop=lambda: not web.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        web.join(10)
    return {"backend": "embedded", "stopped": True}
