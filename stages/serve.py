"""serve: an HTTP server over the INT4 checkpoint (embedded engine), or SGLang on GPUs.

Reads:  CKPT, an `int4-checkpoint` (or, with --weights fp32/bf16, any checkpoint run densely).
Writes: nothing; serves until interrupted.

Routes (embedded backend): GET /health, GET /v1/models, GET /get_model_info,
POST /generate (SGLang's native subset: text | input_ids, sampling_params, return_logprob,
logprob_start_len, stream), POST /v1/completions and POST /v1/chat/completions (OpenAI schema,
`stream: true` as server-sent events), POST /update_weights_from_disk ({"model_path"}: loads a
new int4-checkpoint without restarting; requests already in a batch finish on the old weights).

Batching: one worker thread owns the engine. It takes the first waiting request, keeps
gathering for up to --batch-wait-ms (or until --max-batch requests), and runs them as one
batched generate (prefill each, then decode the whole batch). Requests that arrive while a
batch runs wait for the next one (no continuous batching). The engine is batch-invariant, so
a request's tokens and logprobs do not depend on what it was batched with.

    qatctl serve runs/demo/int4 --port 30000
    qatctl serve runs/demo/int4 --backend sglang -- --tp-size 2     # GPU machine with sglang
"""


# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.
import asyncio
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
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
    max_batch: int = 32  # requests per decode batch
    batch_wait_ms: float = 5.0  # how long the scheduler gathers requests after the first
    threads: int | None = None  # torch threads for the engine (default: torch's)
    model_name: str | None = None  # the id /v1/models reports (default: the folder name)
    sglang_args: tuple[str, ...] = ()  # extra flags passed to sglang.launch_server


# ---------------------------------------------------------------- scheduler

@dataclass
class _Request:
    prompt_ids: list[int]
    params: object
    future: Future = field(default_factory=Future)
    on_token: object = None  # called from the worker thread for streaming


class Scheduler:
    """Gathers waiting requests into one engine.generate batch, on one worker thread."""

    def __init__(self, engine, max_batch: int = 32, batch_wait_s: float = 0.005):
        self.engine, self.max_batch, self.batch_wait_s = engine, max_batch, batch_wait_s
        self.queue: queue.Queue[_Request] = queue.Queue()
        self.batches = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="qatctl-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params, on_token=None) -> Future:
        req = _Request(prompt_ids, params, on_token=on_token)
        self.queue.put(req)
        return req.future

    def swap(self, engine) -> None:
        """Batches that start after this use `engine`; a running batch keeps the old one."""
        self.engine = engine

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.perf_counter() + self.batch_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    batch.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            engine = self.engine
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))

            def on_token(i, tok, lp, batch=batch):
                if batch[i].on_token is not None:
                    batch[i].on_token(tok, lp)

            try:
                outs = engine.generate([r.prompt_ids for r in batch], [r.params for r in batch], on_token=on_token)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for r in batch:
                    r.future.set_exception(e)
                continue
            for r, o in zip(batch, outs, strict=True):
                r.future.set_result(o)


# ---------------------------------------------------------------- request parsing

class BadRequest(Exception):
    pass


def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise BadRequest(f"{key} must be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise BadRequest(f"{key} must be a number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"{key}={v!r} is out of range")
    return kind(v)


def _stops(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise BadRequest(f"stop must be a string or a list of strings, got {v!r}")


# SGLang's sampling parameters (python/sglang/srt/sampling/sampling_params.py) that this server
# does not implement, with the value that means "off": any other value is a 400 naming the
# parameter, never silently ignored.
NATIVE_UNSUPPORTED = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                      "min_new_tokens": 0, "n": 1, "json_schema": None, "regex": None, "ebnf": None,
                      "structural_tag": None, "stop_regex": None, "skip_special_tokens": True,
                      "spaces_between_special_tokens": True, "no_stop_trim": False, "custom_params": None,
                      "stream_interval": None, "logit_bias": None}
NATIVE_SUPPORTED = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "ignore_eos",
                    "sampling_seed", "seed"}
# Top-level /generate fields likewise: (value meaning "off").
GENERATE_UNSUPPORTED = {"top_logprobs_num": (None, 0), "return_text_in_logprobs": (None, False),
                        "token_ids_logprob": (None,), "return_hidden_states": (None, False),
                        "image_data": (None,), "lora_path": (None,), "custom_logit_processor": (None,)}


def _refuse_unsupported(obj: dict, supported: set, unsupported: dict, where: str) -> None:
    for key, value in obj.items():
        if key in supported:
            continue
        if key in unsupported:
            off = unsupported[key] if isinstance(unsupported[key], tuple) else (None, unsupported[key])
            if value in off or value == {}:
                continue
            raise BadRequest(f"{where}{key}={value!r} is not supported by qatctl serve")
        raise BadRequest(f"{where}{key} is not a known parameter")


def sampling_from_native(sp: dict):
    """SGLang `sampling_params` -> SamplingParams (seed: `sampling_seed` or `seed`)."""

    if not isinstance(sp, dict):
        raise BadRequest("sampling_params must be an object")
    _refuse_unsupported(sp, NATIVE_SUPPORTED, NATIVE_UNSUPPORTED, "sampling_params.")
    ids = sp.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise BadRequest("stop_token_ids must be a list of integers")
    seed = sp.get("sampling_seed", sp.get("seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"sampling_seed must be an integer, got {seed!r}")
    top_k = _num(sp, "top_k", int, 0)
    return _params(temperature=_num(sp, "temperature", float, 1.0, 0), top_p=_num(sp, "top_p", float, 1.0, 0, 1),
                   top_k=0 if top_k < 0 else top_k, max_new_tokens=_num(sp, "max_new_tokens", int, 128, 0),
                   stop_token_ids=tuple(ids), stop=_stops(sp.get("stop")), seed=seed,
                   ignore_eos=bool(sp.get("ignore_eos", False)))


def sampling_from_openai(body: dict, default_max: int):
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1 (send the prompt several times instead)")
    max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    top_k = _num(body, "top_k", int, 0)
    return _params(temperature=_num(body, "temperature", float, 1.0, 0, 2), top_p=_num(body, "top_p", float, 1.0, 0, 1),
                   top_k=0 if top_k < 0 else top_k,
                   max_new_tokens=_num(body, max_key, int, default_max, 0),
                   stop=_stops(body.get("stop")), seed=seed)


def _params(**kw):
    from qatctl.engines import SamplingParams

    try:
        return SamplingParams(**kw)
    except QatctlError as e:
        raise BadRequest(str(e).removeprefix("sampling: ")) from None


def _finish(o) -> dict:
    if o.finish_reason == "length":
        return {"type": "length", "length": len(o.output_ids)}
    return {"type": "stop", "matched": o.output_ids[-1] if o.output_ids else None}


# ---------------------------------------------------------------- the app

class Server:
    """The FastAPI app and the state behind it (engine, scheduler, model path)."""

    def __init__(self, engine, config: ServeConfig):
        self.config = config
        self.engine = engine
        self.model_path = str(config.ckpt)
        self.weight_version = "default"  # SGLang's initial label; /update_weights_from_disk may set it
        self.model_name = config.model_name or Path(config.ckpt).name
        self.scheduler = Scheduler(engine, config.max_batch, config.batch_wait_ms / 1000)
        self._swap_lock = threading.Lock()
        self.app = self._build()

    # -- helpers
    def tokenize_text(self, text: str) -> list[int]:
        return self.engine.tokenizer(text)["input_ids"]

    def _prompts_native(self, body: dict) -> tuple[list[list[int]], bool]:
        if ("text" in body) == ("input_ids" in body):
            raise BadRequest("give exactly one of text or input_ids")
        if "text" in body:
            t = body["text"]
            if isinstance(t, str):
                return [self.tokenize_text(t)], False
            if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
                return [self.tokenize_text(x) for x in t], True
            raise BadRequest("text must be a string or a non-empty list of strings")
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return [ids], False
        if (isinstance(ids, list) and ids and all(isinstance(x, list) and x for x in ids)
                and all(isinstance(i, int) for x in ids for i in x)):
            return ids, True
        raise BadRequest("input_ids must be a non-empty list of token ids, or a list of such lists")

    def _check_ids(self, prompts: list[list[int]]) -> None:
        vocab = self.engine.embed.shape[0]
        for p in prompts:
            if any(i < 0 or i >= vocab for i in p):
                raise BadRequest(f"token id out of range [0, {vocab})")

    async def _complete(self, prompt_ids, params, on_token=None):
        fut = self.scheduler.submit(prompt_ids, params, on_token)
        return await asyncio.wrap_future(fut)

    def update_weights(self, model_path: str) -> tuple[bool, str]:
        from qatctl.artifacts import read_artifact
        from qatctl.engines import load_engine

        with self._swap_lock:
            try:
                if self.config.weights == "int4":
                    read_artifact(Path(model_path), "int4-checkpoint")
                new = load_engine(model_path, weights=self.config.weights, device=self.config.device)
            except QatctlError as e:
                return False, str(e)
            if new.vocab_size != self.engine.vocab_size:
                return False, (f"{model_path}: vocab {new.vocab_size} differs from the served model's "
                               f"{self.engine.vocab_size}")
            self.engine = new
            self.scheduler.swap(new)
            self.model_path = model_path
            log.info("weights updated from %s (kernel %s)", model_path, new.kernel)
            return True, f"Succeeded to update model weights from {model_path}"

    def _build(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI(title="qatctl serve", docs_url=None, redoc_url=None)
        server = self

        @app.middleware("http")
        async def auth(request: Request, call_next):
            key = server.config.api_key
            if key and request.url.path != "/health":
                if request.headers.get("authorization") != f"Bearer {key}":
                    return JSONResponse({"error": {"message": "invalid or missing API key", "code": 401}},
                                        status_code=401)
            return await call_next(request)

        def _bad(message: str):
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": 400}},
                                status_code=400)

        async def body_of(request: Request) -> dict:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"invalid JSON body ({e})") from None
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object")
            return body

        @app.exception_handler(BadRequest)
        async def bad_request(_request, exc):
            return _bad(str(exc))

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "qatctl",
                                                "root": server.model_path}]}

        @app.get("/get_weight_version")
        async def weight_version():
            return {"weight_version": server.weight_version}

        @app.get("/get_model_info")
        async def model_info():
            return {"model_path": server.model_path, "tokenizer_path": server.model_path, "is_generation": True,
                    "weight_version": server.weight_version,
                    **server.engine.info(), "batches": server.scheduler.batches,
                    "largest_batch": server.scheduler.largest_batch}

        @app.post("/update_weights_from_disk")
        async def update_weights(request: Request):
            body = await body_of(request)
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise BadRequest("model_path must be a non-empty string")
            version = body.get("weight_version")
            if version is not None and not isinstance(version, str):
                raise BadRequest("weight_version must be a string")
            ok, message = await asyncio.to_thread(server.update_weights, path)
            if ok and version is not None:
                server.weight_version = version
            return JSONResponse({"success": ok, "message": message, "num_paused_requests": 0},
                                status_code=200 if ok else 400)

        @app.post("/generate")
        async def generate(request: Request):
            body = await body_of(request)
            prompts, batched = server._prompts_native(body)
            server._check_ids(prompts)
            sp = body.get("sampling_params") or {}
            sps = sp if isinstance(sp, list) else [sp] * len(prompts)
            if len(sps) != len(prompts):
                raise BadRequest("sampling_params list length differs from the number of prompts")
            params = [sampling_from_native(s) for s in sps]
            unsupported = {k: v for k, v in body.items() if k in GENERATE_UNSUPPORTED}
            _refuse_unsupported(unsupported, set(), GENERATE_UNSUPPORTED, "")
            rid = body.get("rid")
            rids = rid if isinstance(rid, list) else [rid] * len(prompts)
            if len(rids) != len(prompts) or not all(r is None or isinstance(r, str) for r in rids):
                raise BadRequest("rid must be a string, or a list of strings with one per prompt")
            want_lp = bool(body.get("return_logprob", False))
            start = body.get("logprob_start_len", -1)
            if not isinstance(start, int):
                raise BadRequest("logprob_start_len must be an integer")
            if body.get("stream"):
                if batched:
                    raise BadRequest("stream supports one prompt per request")
                return _sse(server._native_stream(prompts[0], params[0], want_lp))
            outs = await asyncio.gather(*(server._complete(p, s) for p, s in zip(prompts, params, strict=True)))
            results = []
            for p, o, r in zip(prompts, outs, rids, strict=True):
                meta = {"id": r or uuid.uuid4().hex, "prompt_tokens": len(p), "completion_tokens": len(o.output_ids),
                        "finish_reason": _finish(o), "weight_version": server.weight_version}
                if want_lp:
                    meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(o.logprobs, o.output_ids,
                                                                                    strict=True)]
                    if start >= 0:
                        meta["input_token_logprobs"] = await asyncio.to_thread(server._input_logprobs, p, start)
                results.append({"text": o.text, "output_ids": o.output_ids, "meta_info": meta})
            return results if batched else results[0]

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await body_of(request)
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                ids = server.tokenize_text(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
                ids = prompt
            elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                ids = server.tokenize_text(prompt[0])
            else:
                raise BadRequest("prompt must be a string (or one token-id list)")
            server._check_ids([ids])
            params = sampling_from_openai(body, default_max=16)
            want_lp = body.get("logprobs") not in (None, False, 0)
            if body.get("stream"):
                return _sse(server._openai_stream(ids, params, chat=False))
            o = await server._complete(ids, params)
            choice = {"index": 0, "text": o.text, "finish_reason": o.finish_reason,
                      "logprobs": server._openai_logprobs(o, chat=False) if want_lp else None}
            return server._openai_response("text_completion", choice, len(ids), o)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await body_of(request)
            messages = body.get("messages")
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages)):
                raise BadRequest("messages must be a non-empty list of {role, content} strings")
            from qatctl.data import chat_prompt_ids

            ids = chat_prompt_ids(server.engine.tokenizer, messages)
            params = sampling_from_openai(body, default_max=128)
            if body.get("stream"):
                return _sse(server._openai_stream(ids, params, chat=True))
            o = await server._complete(ids, params)
            choice = {"index": 0, "message": {"role": "assistant", "content": o.text},
                      "finish_reason": o.finish_reason,
                      "logprobs": server._openai_logprobs(o, chat=True) if body.get("logprobs") else None}
            return server._openai_response("chat.completion", choice, len(ids), o)

        def _sse(gen):
            return StreamingResponse(gen, media_type="text/event-stream")

        return app

    # -- response helpers
    def _input_logprobs(self, ids: list[int], start: int) -> list:
        """SGLang's input_token_logprobs from position `start`; position 0 has no logprob."""
        first = max(start, 1)
        lps = self.engine.score([ids[:first]], [ids[first:]])[0] if first < len(ids) else []
        head = [[None, ids[0], None]] if start == 0 else []
        return head + [[lp, t, None] for lp, t in zip(lps, ids[first:], strict=True)]

    def _openai_logprobs(self, o, chat: bool):
        tok = self.engine.tokenizer
        pieces = [tok.decode([t]) for t in o.output_ids]
        if chat:
            return {"content": [{"token": s, "logprob": lp} for s, lp in zip(pieces, o.logprobs, strict=True)]}
        return {"tokens": pieces, "token_logprobs": o.logprobs}

    def _openai_response(self, obj: str, choice: dict, n_prompt: int, o) -> dict:
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(o.output_ids),
                          "total_tokens": n_prompt + len(o.output_ids)}}

    async def _token_stream(self, ids, params):
        """Yield ('token', id, logprob) as the worker samples them, then ('done', completion)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut = self.scheduler.submit(ids, params, lambda t, lp: loop.call_soon_threadsafe(q.put_nowait, (t, lp)))
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(q.put_nowait, None))
        while (item := await q.get()) is not None:
            yield "token", item
        yield "done", fut.result()

    async def _text_deltas(self, ids, params):
        """(delta text, completion or None): text decoded so far minus what was sent; a partial
        UTF-8 character is held back until complete. Stop strings are cut at the end."""
        tok, out, sent = self.engine.tokenizer, [], ""
        async for kind, item in self._token_stream(ids, params):
            if kind == "token":
                out.append(item[0])
                text = tok.decode(out, skip_special_tokens=True)
                if text.endswith("\ufffd") or params.stop:
                    continue  # with stop strings the final text (cut at the stop) is sent at the end
                if text.startswith(sent) and len(text) > len(sent):
                    yield text[len(sent):], None
                    sent = text
            else:
                final = item.text
                yield (final[len(sent):] if final.startswith(sent) else ""), item

    async def _native_stream(self, ids, params, want_lp):
        text = ""
        async for delta, done in self._text_deltas(ids, params):
            text += delta
            if done is None:
                payload = {"text": text, "meta_info": {"finish_reason": None}}
            else:
                meta = {"prompt_tokens": len(ids), "completion_tokens": len(done.output_ids),
                        "finish_reason": _finish(done)}
                if want_lp:
                    meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(done.logprobs, done.output_ids,
                                                                                    strict=True)]
                payload = {"text": done.text, "output_ids": done.output_ids, "meta_info": meta}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    async def _openai_stream(self, ids, params, chat: bool):
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish, role=False):
            if chat:
                d = {"role": "assistant"} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            return f"data: {json.dumps({'id': cid, 'object': obj, 'created': created, 'model': self.model_name, 'choices': [choice]})}\n\n"

        if chat:
            yield chunk(None, None, role=True)
        async for delta, done in self._text_deltas(ids, params):
            if done is None:
                yield chunk(delta, None)
            else:
                if delta:
                    yield chunk(delta, None)
                yield chunk(None if chat else "", done.finish_reason)
        yield "data: [DONE]\n\n"


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
    from qatctl.ui import console

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = load_engine(config.ckpt, weights=config.weights, device=config.device)
    server = Server(engine, config)
    console.print(f"serving {config.ckpt} on http://{config.host}:{config.port} — engine embedded, kernel "
                  f"{engine.kernel} on {engine.device}, {torch.get_num_threads()} threads, batches up to {config.max_batch} "
                  f"(gather {config.batch_wait_ms} ms)" + (", API key required" if config.api_key else ""))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(server.app, host=config.host, port=config.port, log_level="warning")
    return {"backend": "embedded", "stopped": True}
