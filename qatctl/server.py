"""The HTTP server of `qatctl serve`: SGLang's native routes (qatctl/server_native.py) and the
OpenAI routes (qatctl/server_openai.py) over the embedded engine, driven by the continuous-batching
scheduler (qatctl/engines/scheduler.py). This module holds what both share: the Server's state and
request checks, the token stream, weight updates, the app with its error handlers, and the guard
(API key, body limit).

Routes: GET /health, /health_generate (a one-token generation), /v1/models, /get_model_info and
/model_info, /get_server_info and /server_info, /get_weight_version; GET|POST /flush_cache;
POST /generate, /abort_request, /pause_generation, /continue_generation,
/update_weights_from_disk, /v1/completions, /v1/chat/completions. Shapes follow SGLang's
http_server.py and the OpenAI schema; request schemas are in qatctl/api.py.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.
import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from qatctl.api import BadRequest, Overloaded, UpdateWeightsRequest, error_body, validation_message
from qatctl.engines.scheduler import Scheduler
from qatctl.errors import QatctlError
from qatctl.server_native import NativeRoutes
from qatctl.server_openai import OpenAIRoutes

if TYPE_CHECKING:
    from qatctl.engines import BatchingEngine

log = logging.getLogger("qatctl.serve")


class Server(NativeRoutes, OpenAIRoutes):
    """The FastAPI app and the state behind it (engine, scheduler, model path, weight version)."""

    def __init__(self, engine: "BatchingEngine", config, scheduler_thread: bool = True):
        self.config = config
        self.engine = engine
        self.model_path = str(config.ckpt)
        self.weight_version = "default"  # SGLang's initial label; /update_weights_from_disk may set it
        self.model_name = config.model_name or Path(config.ckpt).name
        self.scheduler = Scheduler(engine, config.max_batch, max_queue=config.max_queue, thread=scheduler_thread)
        self.scheduler.label = self.weight_version
        self.updating = False  # one /update_weights_from_disk at a time; the others get 409 at once
        self.app = self._build()

    # ------------------------------------------------------------ helpers
    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Off the event loop: a huge prompt must not stall /health and the other clients."""
        tok = self.engine.tokenizer
        return await asyncio.to_thread(lambda: [tok(t)["input_ids"] for t in texts])

    def piece(self, tok: int) -> str:
        return self.engine.tokenizer.decode([tok])

    def check(self, prompts: list[list[int]], params: list, field: str = "prompt") -> None:
        """Everything about a request that could fail it later, checked before any of it joins a
        batch: a bad request fails alone with a 400 and its batch-mates never see it."""
        c, vocab, ctx = self.config, self.engine.vocab_size, self.engine.max_pos
        if len(prompts) * len(params) > c.max_prompts_per_request:
            raise BadRequest(f"{len(prompts)} prompts x n={len(params)} exceeds --max-prompts-per-request "
                             f"{c.max_prompts_per_request}", field)
        for i, p in enumerate(prompts):
            if not p:
                raise BadRequest(f"prompt {i} is empty", field)
            if any(t < 0 or t >= vocab for t in p):
                raise BadRequest(f"prompt {i}: token id out of range [0, {vocab})", field)
            for sp in params:
                if c.max_new_tokens_cap is not None and sp.max_new_tokens > c.max_new_tokens_cap:
                    raise BadRequest(f"max_new_tokens={sp.max_new_tokens} exceeds the server's --max-new-tokens-cap "
                                     f"{c.max_new_tokens_cap}", "max_new_tokens")
                if len(p) + sp.max_new_tokens > ctx:
                    raise BadRequest(f"prompt {i} ({len(p)} tokens) + max_new_tokens {sp.max_new_tokens} exceeds the "
                                     f"model's context of {ctx} tokens", "max_new_tokens")
                if any(t >= vocab for t, _ in sp.logit_bias):
                    raise BadRequest(f"logit_bias: a token id is out of range [0, {vocab})", "logit_bias")

    async def complete(self, prompt_ids, params, rid=None, on_token=None, request: Request | None = None):
        """One sequence's Result; if the client goes away first, its work is dropped at the next step."""
        fut = self.scheduler.submit(prompt_ids, params, on_token=on_token, rid=rid)
        waiter = asyncio.wrap_future(fut)
        while request is not None:
            done, _ = await asyncio.wait({waiter}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                self.scheduler.cancel(fut)
                break
        try:
            return await waiter
        except QatctlError as e:
            raise BadRequest(str(e)) from None

    async def prompt_logprobs(self, ids: list[int], top_n: int):
        """Logprob (and top-N) of every prompt token after the first, computed on the worker."""
        return await asyncio.wrap_future(self.scheduler.call(lambda: self.engine.prompt_logprobs(ids, top_n)))

    async def update_weights(self, req: UpdateWeightsRequest) -> tuple[bool, str]:
        if self.updating:  # checked and set on the event loop: no await in between
            return False, "a weight update is already in progress; retry when it has finished"
        self.updating = True
        try:
            return await self._update_weights(req)
        finally:
            self.updating = False

    async def _update_weights(self, req: UpdateWeightsRequest) -> tuple[bool, str]:
        from qatctl.artifacts import read_artifact
        from qatctl.engines import load_engine

        if req.abort_all_requests:
            await asyncio.wrap_future(self.scheduler.abort(abort_all=True))
        try:
            if self.config.weights == "int4":
                read_artifact(Path(req.model_path), "int4-checkpoint")
            new = await asyncio.to_thread(load_engine, req.model_path, weights=self.config.weights,
                                          device=self.config.device)
        except QatctlError as e:
            return False, str(e)
        if new.vocab_size != self.engine.vocab_size:
            return False, f"{req.model_path}: vocab {new.vocab_size} differs from the served model's {self.engine.vocab_size}"
        # running requests finish on the old weights and report the old weight_version
        await asyncio.wrap_future(self.scheduler.swap(new, req.weight_version))
        self.engine, self.model_path = new, req.model_path
        if req.weight_version is not None:
            self.weight_version = req.weight_version
        log.info("weights updated from %s (kernel %s)", req.model_path, new.kernel)
        return True, f"Succeeded to update model weights from {req.model_path}"

    def server_info(self) -> dict:
        c = self.config
        return {"model_path": self.model_path, "served_model_name": self.model_name, "host": c.host, "port": c.port,
                "max_running_requests": c.max_batch, "weights": c.weights, "device": c.device,
                "weight_version": self.weight_version, "version": _version(),
                "internal_states": [{**self.scheduler.state(), **self.engine.info()}]}

    # ------------------------------------------------------------ the app
    def _build(self):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse

        from qatctl import server_native, server_openai

        app = FastAPI(title="qatctl serve", description="SGLang-native and OpenAI routes over the embedded INT4 engine",
                      version=_version(), redoc_url=None)
        app.add_middleware(_Guard, server=self)

        @app.exception_handler(BadRequest)
        async def bad_request(_request, exc):
            return JSONResponse(error_body(str(exc), exc.param, 400), status_code=400)

        @app.exception_handler(RequestValidationError)
        async def invalid(_request, exc):
            message, field = validation_message(exc.errors()[0])
            return JSONResponse(error_body(message, field, 400), status_code=400)

        @app.exception_handler(Overloaded)
        async def overloaded(_request, exc):
            return JSONResponse(error_body(str(exc), None, 503, "server_overloaded"), status_code=503)

        server_native.register(app, self)
        server_openai.register(app, self)
        return app

    def _room(self, k: int) -> None:
        if k > self.config.max_prompts_per_request:
            raise BadRequest(f"{k} prompts exceed --max-prompts-per-request {self.config.max_prompts_per_request}",
                             "prompt")
        if not self.scheduler.has_room(k):
            raise Overloaded(f"the request queue is full (--max-queue {self.config.max_queue}); retry later")

    async def _tokens(self, ids, params, rid=None):
        """('token', (id, logprob)) as the worker samples them, ('text', text so far) when the decoded
        text grows (a partial UTF-8 character or a possible stop string is held back), then
        ('done', Result). A client that goes away aborts its request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut = self.scheduler.submit(ids, params, rid=rid,
                                    on_token=lambda t, lp, top: loop.call_soon_threadsafe(q.put_nowait, (t, lp, top)))
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(q.put_nowait, None))
        tok, out, sent = self.engine.tokenizer, [], ""
        try:
            while (item := await q.get()) is not None:
                yield "token", item
                out.append(item[0])
                if params.stop:
                    continue  # with stop strings the final text (cut at the stop) is sent at the end
                text = tok.decode(out, skip_special_tokens=params.skip_special_tokens)
                if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                    sent = text
                    yield "text", text
            try:
                result = fut.result()
            except QatctlError as e:
                raise BadRequest(str(e)) from None
            yield "done", result
        finally:
            if not fut.done():
                self.scheduler.cancel(fut)


class _Guard:
    """The API key and the body-size limit, as a plain ASGI middleware (Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the routes, and abandoned work
    could then not be dropped).

    The limit holds on the bytes actually received, not on what Content-Length claims: a body
    sent chunked (no Content-Length) is read here up to --max-request-bytes and refused with 413
    the moment it passes, so the server never holds more than the limit for one request. The
    route then reads the buffered body; later `receive` calls (disconnect checks) go to the client.
    """

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        key = self.server.config.api_key
        if key and scope["path"] != "/health":
            import hmac

            if not hmac.compare_digest(headers.get("authorization", b""), f"Bearer {key}".encode()):
                response = JSONResponse(error_body("invalid or missing API key", None, 401, "authentication_error"),
                                        status_code=401)
                return await response(scope, receive, send)
        limit = self.server.config.max_request_bytes

        def too_large(what: str):
            return JSONResponse(error_body(f"request body of {what} exceeds --max-request-bytes {limit}", "body", 413),
                                status_code=413, headers={"connection": "close"})

        size = headers.get("content-length", b"")
        if size.isdigit() and int(size) > limit:
            return await too_large(f"{int(size)} bytes")(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await too_large(f"more than {limit} bytes")(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qatctl")
    except PackageNotFoundError:
        return "unknown"
