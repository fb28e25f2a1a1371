"""The HTTP server of `qatctl serve`: SGLang's native routes and the OpenAI routes over the
embedded engine, driven by the continuous-batching scheduler (qatctl/engines/scheduler.py).

Routes: GET /health, /health_generate (a one-token generation), /v1/models, /get_model_info and
/model_info, /get_server_info and /server_info, /get_weight_version; GET|POST /flush_cache;
POST /generate, /abort_request, /pause_generation, /continue_generation,
/update_weights_from_disk, /v1/completions, /v1/chat/completions. Shapes follow SGLang's
http_server.py and the OpenAI schema; request schemas are in qatctl/api.py.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.
import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from qatctl.api import (
    AbortRequest,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    NativeSampling,
    Overloaded,
    PauseRequest,
    UpdateWeightsRequest,
    validation_message,
)
from qatctl.engines.scheduler import Scheduler
from qatctl.errors import QatctlError

if TYPE_CHECKING:
    from qatctl.engines import BatchingEngine

log = logging.getLogger("qatctl.serve")
HEALTH_CHECK_TIMEOUT_S = 20


def _finish(o) -> dict:
    """SGLang's meta_info.finish_reason."""
    if o.finish_reason == "length":
        return {"type": "length", "length": len(o.output_ids)}
    if o.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": o.matched}


class Server:
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
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        app = FastAPI(title="qatctl serve", description="SGLang-native and OpenAI routes over the embedded INT4 engine",
                      version=_version(), redoc_url=None)
        app.add_middleware(_Guard, server=self)
        server = self

        async def body_of(request: Request) -> dict:
            """An optional JSON object body (the control routes take {} or nothing)."""
            raw = await request.body()
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"invalid JSON body ({e})", "body") from None
            if not isinstance(body, dict):
                raise BadRequest("the JSON body must be an object", "body")
            return body

        @app.exception_handler(BadRequest)
        async def bad_request(_request, exc):
            return JSONResponse(_error(str(exc), exc.param, 400), status_code=400)

        @app.exception_handler(RequestValidationError)
        async def invalid(_request, exc):
            message, field = validation_message(exc.errors()[0])
            return JSONResponse(_error(message, field, 400), status_code=400)

        @app.exception_handler(Overloaded)
        async def overloaded(_request, exc):
            return JSONResponse(_error(str(exc), None, 503, "server_overloaded"), status_code=503)

        # -------------------------------------------------------- control
        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/health_generate")
        async def health_generate():
            from qatctl.engines import SamplingParams

            fut = server.scheduler.submit([0], SamplingParams(temperature=0, max_new_tokens=1), rid="HEALTH_CHECK")
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), HEALTH_CHECK_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - paused, wedged or failing: not healthy
                fut.cancel()
                return Response(status_code=503)
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "qatctl",
                                                "root": server.model_path,
                                                "max_model_len": server.engine.max_pos}]}

        @app.get("/get_weight_version")
        @app.get("/weight_version")
        async def weight_version():
            return {"weight_version": server.weight_version}

        @app.get("/get_model_info")
        @app.get("/model_info")
        async def model_info():
            return {"model_path": server.model_path, "tokenizer_path": server.model_path, "is_generation": True,
                    "weight_version": server.weight_version, "model_type": server.engine.model_type,
                    **server.engine.info(), "batches": server.scheduler.steps,
                    "largest_batch": server.scheduler.largest_batch}

        @app.get("/get_server_info")
        @app.get("/server_info")
        async def server_info():
            return server.server_info()

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush_cache():
            ok = await asyncio.wrap_future(server.scheduler.flush_cache())
            if ok:
                return Response("Cache flushed.\n", status_code=200)
            return Response("Flush cache failed: there are running or waiting requests.\n", status_code=400)

        @app.post("/abort_request")
        async def abort_request(req: AbortRequest):
            req.refuse_unsupported()
            await asyncio.wrap_future(server.scheduler.abort(rid=req.rid or None, abort_all=req.abort_all))
            return Response(status_code=200)

        @app.post("/pause_generation")
        async def pause_generation(request: Request):
            from qatctl.api import parse

            req = parse(PauseRequest, await body_of(request))
            await asyncio.wrap_future(server.scheduler.pause(req.mode))
            return {"message": "Generation paused successfully.", "status": "ok"}

        @app.post("/continue_generation")
        async def continue_generation(request: Request):
            await body_of(request)
            await asyncio.wrap_future(server.scheduler.resume())
            return {"message": "Generation continued successfully.", "status": "ok"}

        @app.post("/update_weights_from_disk")
        async def update_weights(req: UpdateWeightsRequest):
            req.refuse_unsupported()
            busy = server.updating
            ok, message = await server.update_weights(req)
            return JSONResponse({"success": ok, "message": message, "num_paused_requests": 0},
                                status_code=200 if ok else 409 if busy else 400)

        # -------------------------------------------------------- generation
        @app.api_route("/generate", methods=["POST", "PUT"])
        async def generate(req: GenerateRequest, request: Request):
            req.refuse_unsupported()
            return await server.native(req, request, StreamingResponse)

        @app.post("/v1/completions")
        async def completions(req: CompletionRequest, request: Request):
            req.refuse_unsupported()
            return await server.openai_completions(req, request, StreamingResponse)

        @app.post("/v1/chat/completions")
        async def chat(req: ChatRequest, request: Request):
            req.refuse_unsupported()
            return await server.openai_chat(req, request, StreamingResponse)

        return app

    # ------------------------------------------------------------ SGLang native /generate
    async def _native_prompts(self, req: GenerateRequest) -> tuple[list[list[int]], bool]:
        if (req.text is None) == (req.input_ids is None):
            raise BadRequest("give exactly one of text or input_ids", "text")
        if req.text is not None:
            if isinstance(req.text, str):
                return await self.tokenize([req.text]), False
            if not req.text:
                raise BadRequest("text must be a string or a non-empty list of strings", "text")
            self._room(len(req.text))
            return await self.tokenize(req.text), True
        ids = req.input_ids
        if ids and isinstance(ids[0], list):
            return ids, True
        return [ids], False

    def _room(self, k: int) -> None:
        if k > self.config.max_prompts_per_request:
            raise BadRequest(f"{k} prompts exceed --max-prompts-per-request {self.config.max_prompts_per_request}",
                             "prompt")
        if not self.scheduler.has_room(k):
            raise Overloaded(f"the request queue is full (--max-queue {self.config.max_queue}); retry later")

    async def native(self, req: GenerateRequest, request, StreamingResponse):
        prompts, batched = await self._native_prompts(req)
        sps = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params] * len(prompts)
        if len(sps) != len(prompts):
            raise BadRequest("sampling_params list length differs from the number of prompts", "sampling_params")
        top_n = req.top_logprobs_num if req.return_logprob else 0
        params = [(sp or NativeSampling()).to_params(top_n) for sp in sps]
        for p, ps in zip(prompts, params, strict=True):
            self.check([p], ps, "input_ids" if req.input_ids is not None else "text")
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        if len(rids) != len(prompts):
            raise BadRequest("rid must be a string, or a list of strings with one per prompt", "rid")
        self._room(sum(map(len, params)))
        if req.stream:
            if batched or len(params[0]) != 1:
                raise BadRequest("stream supports one prompt with n=1 per request", "stream")
            return StreamingResponse(self._native_stream(prompts[0], params[0][0], rids[0], req),
                                     media_type="text/event-stream")
        jobs = [(p, sp, rid if len(ps) == 1 or rid is None else f"{rid}_{j}", rid)
                for p, ps, rid in zip(prompts, params, rids, strict=True) for j, sp in enumerate(ps)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.complete(p, sp, rid=group, request=request) for p, sp, _, group in jobs))
        out = []
        for (p, _sp, rid, _), res in zip(jobs, results, strict=True):
            out.append(await self._native_result(p, res.completion, res.cached_tokens, rid, req,
                                                 time.perf_counter() - t0, res.weight_version))
        return out if batched or len(out) > 1 else out[0]

    def _lp_entries(self, lps, ids, with_text: bool):
        return [[lp, t, self.piece(t) if with_text else None] for lp, t in zip(lps, ids, strict=True)]

    def _top_entries(self, tops, with_text: bool):
        return [None if top is None else [[lp, t, self.piece(t) if with_text else None] for t, lp in top]
                for top in tops]

    async def _native_result(self, p, o, cached, rid, req: GenerateRequest, latency: float,
                             version: str | None = None) -> dict:
        meta = {"id": rid or uuid.uuid4().hex, "prompt_tokens": len(p), "completion_tokens": len(o.output_ids),
                "cached_tokens": cached, "finish_reason": _finish(o), "weight_version": version or self.weight_version,
                "e2e_latency": latency}
        if req.return_logprob:
            text = req.return_text_in_logprobs
            meta["output_token_logprobs"] = self._lp_entries(o.logprobs, o.output_ids, text)
            if req.top_logprobs_num:
                meta["output_top_logprobs"] = self._top_entries(o.top_logprobs, text)
            if req.logprob_start_len >= 0:
                start = req.logprob_start_len
                lps, tops = await self.prompt_logprobs(p, req.top_logprobs_num)
                lps, tops = [None] + lps, [None] + tops  # the first prompt token has no logprob
                meta["input_token_logprobs"] = self._lp_entries(lps[start:], p[start:], text)
                if req.top_logprobs_num:
                    meta["input_top_logprobs"] = self._top_entries(tops[start:], text)
        return {"text": o.text, "output_ids": o.output_ids, "meta_info": meta}

    async def _native_stream(self, ids, params, rid, req):
        """SGLang's native stream: each event carries the text and ids so far (not deltas)."""
        t0 = time.perf_counter()
        try:
            async for kind, item in self._tokens(ids, params, rid):
                if kind == "token":
                    continue
                if kind == "text":
                    yield f"data: {json.dumps({'text': item, 'meta_info': {'id': rid, 'finish_reason': None}})}\n\n"
                else:
                    res = await self._native_result(ids, item.completion, item.cached_tokens, rid, req,
                                                    time.perf_counter() - t0, item.weight_version)
                    yield f"data: {json.dumps(res)}\n\n"
        except Exception as e:  # noqa: BLE001 - SGLang's shape: an error event, then the stream ends
            log.warning("stream failed: %s", e)
            yield f"data: {json.dumps(_error(str(e), None, 400 if isinstance(e, BadRequest) else 500))}\n\n"
        yield "data: [DONE]\n\n"

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

    # ------------------------------------------------------------ OpenAI
    def _choice_logprobs(self, o, prompt_ids, echo: bool, top_n: int, prompt_lp=None, chat=False):
        ids = list(o.output_ids)
        lps = list(o.logprobs)
        tops = list(o.top_logprobs) if top_n else [None] * len(ids)
        if chat:
            return {"content": [self._chat_lp(t, lp, top) for t, lp, top in zip(ids, lps, tops, strict=True)]}
        if echo:
            plps, ptops = prompt_lp
            ids = list(prompt_ids) + ids
            lps = [None] + plps + lps
            tops = [None] + (ptops if top_n else [None] * len(plps)) + tops
        pieces = [self.piece(t) for t in ids]
        offsets, at = [], 0
        for s in pieces:
            offsets.append(at)
            at += len(s)
        return {"tokens": pieces, "token_logprobs": lps,
                "top_logprobs": [None if top is None else {self.piece(t): lp for t, lp in top} for top in tops],
                "text_offset": offsets}

    def _chat_lp(self, t, lp, top):
        s = self.piece(t)
        entry = {"token": s, "logprob": lp, "bytes": list(s.encode())}
        entry["top_logprobs"] = [] if top is None else [
            {"token": self.piece(i), "logprob": v, "bytes": list(self.piece(i).encode())} for i, v in top]
        return entry

    async def openai_completions(self, req: CompletionRequest, request, StreamingResponse):
        p = req.prompt
        if isinstance(p, str):
            prompts = await self.tokenize([p])
        elif p and isinstance(p[0], int):
            prompts = [p]
        elif p and isinstance(p[0], str):
            self._room(len(p))
            prompts = await self.tokenize(p)
        elif p and isinstance(p[0], list):
            prompts = p
        else:
            raise BadRequest("prompt must be a string, a list of strings, or token-id list(s)", "prompt")
        max_new = 16 if req.max_tokens is None else req.max_tokens
        top_n = req.logprobs or 0
        params = req.to_params(max_new, top_n)
        self.check(prompts, params)
        self._room(len(prompts) * len(params))
        if req.echo and req.stream:
            raise BadRequest("echo is not supported with stream", "echo")
        jobs = [(i * req.n + j, ids, sp) for i, ids in enumerate(prompts) for j, sp in enumerate(params)]
        if req.stream:
            return StreamingResponse(self._openai_stream(jobs, req, chat=False, prompt_tokens=sum(map(len, prompts))),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self.complete(ids, sp, request=request) for _, ids, sp in jobs))
        prompt_lp = {}
        if req.echo and req.logprobs is not None:
            for i, ids in enumerate(prompts):
                prompt_lp[i] = await self.prompt_logprobs(ids, top_n)
        choices = []
        for (index, ids, _), res in zip(jobs, results, strict=True):
            o = res.completion
            text = (self.engine.tokenizer.decode(ids) if req.echo else "") + o.text
            lp = None
            if req.logprobs is not None:
                lp = self._choice_logprobs(o, ids, req.echo, top_n, prompt_lp.get(index // req.n))
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason})
        return self._openai_body("text_completion", choices, prompts, results)

    async def openai_chat(self, req: ChatRequest, request, StreamingResponse):
        from qatctl.data import chat_prompt_ids

        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await asyncio.to_thread(chat_prompt_ids, self.engine.tokenizer, messages)
        max_new = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), 128)
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        params = req.to_params(max_new, top_n)
        self.check([ids], params, "messages")
        self._room(len(params))
        jobs = [(j, ids, sp) for j, sp in enumerate(params)]
        if req.stream:
            return StreamingResponse(self._openai_stream(jobs, req, chat=True, prompt_tokens=len(ids)),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self.complete(ids, sp, request=request) for _, ids, sp in jobs))
        choices = [{"index": j, "message": {"role": "assistant", "content": res.completion.text},
                    "logprobs": self._choice_logprobs(res.completion, ids, False, top_n, chat=True) if req.logprobs else None,
                    "finish_reason": res.completion.finish_reason}
                   for (j, _, _), res in zip(jobs, results, strict=True)]
        return self._openai_body("chat.completion", choices, [ids], results)

    def _openai_body(self, obj: str, choices, prompts, results) -> dict:
        completion = sum(len(r.completion.output_ids) for r in results)
        prompt = sum(map(len, prompts))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": self.model_name,
                "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                          "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}}

    async def _openai_stream(self, jobs, req, chat: bool, prompt_tokens: int):
        """Server-sent events: the choices' deltas interleaved as they are sampled, each with its
        token's logprobs when asked; then, with stream_options.include_usage, a usage chunk."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        want_lp = bool(req.logprobs) if chat else req.logprobs is not None
        q: asyncio.Queue = asyncio.Queue()

        def event(choices, usage=None):
            body = {"id": cid, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if usage_on:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def run(index, ids, sp):
            try:
                sent = ""
                async for kind, item in self._tokens(ids, sp):
                    await q.put((index, kind, item, sent))
                    if kind == "text":
                        sent = item
            except Exception as e:  # noqa: BLE001 - reported in the stream, which then ends
                await q.put((index, "error", str(e), ""))
                return
            await q.put((index, "end", None, ""))

        tasks = [asyncio.create_task(run(*job)) for job in jobs]
        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i, _, _ in jobs])
            open_, completion_tokens, cached = len(jobs), 0, 0
            pending_lp: dict[int, list] = {i: [] for i, _, _ in jobs}
            while open_:
                index, kind, item, sent = await q.get()
                if kind == "end":
                    open_ -= 1
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(_error(item, None, 400))}\n\n"
                    break
                if kind == "token":
                    if want_lp:
                        pending_lp[index].append(item)
                    continue
                if kind == "text":
                    delta = item[len(sent):]
                    finish = None
                else:  # done
                    o = item.completion
                    completion_tokens += len(o.output_ids)
                    cached += item.cached_tokens
                    delta = o.text[len(sent):] if o.text.startswith(sent) else ""
                    finish = o.finish_reason
                lp = None
                if want_lp and pending_lp[index]:
                    toks = pending_lp[index]
                    pending_lp[index] = []
                    if chat:
                        lp = {"content": [self._chat_lp(t, v, top) for t, v, top in toks]}
                    else:
                        lp = {"tokens": [self.piece(t) for t, _, _ in toks], "token_logprobs": [v for _, v, _ in toks],
                              "top_logprobs": [None if top is None else {self.piece(i): v for i, v in top}
                                               for _, _, top in toks]}
                if chat:
                    choice = {"index": index, "delta": {"content": delta} if delta or finish is None else {},
                              "logprobs": lp, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": delta, "logprobs": lp, "finish_reason": finish}
                yield event([choice])
            if usage_on:
                yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens,
                                 "prompt_tokens_details": {"cached_tokens": cached}})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()


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
                response = JSONResponse(_error("invalid or missing API key", None, 401, "authentication_error"),
                                        status_code=401)
                return await response(scope, receive, send)
        limit = self.server.config.max_request_bytes

        def too_large(what: str):
            return JSONResponse(_error(f"request body of {what} exceeds --max-request-bytes {limit}", "body", 413),
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


def _error(message: str, param: str | None, code: int, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object (SGLang and vLLM use it on every route)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qatctl")
    except PackageNotFoundError:
        return "unknown"
