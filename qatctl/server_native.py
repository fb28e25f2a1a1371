"""SGLang's native routes of `qatctl serve`: /health, /health_generate, the model and server info,
the weight version, /flush_cache, /abort_request, /pause_generation, /continue_generation,
/update_weights_from_disk and /generate, in the shapes of SGLang's http_server.py (request schemas
in qatctl/api.py). `NativeRoutes` holds the /generate logic as methods of qatctl.server.Server.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.
import asyncio
import json
import logging
import time
import uuid

from fastapi import Request

from qatctl.api import (
    AbortRequest,
    BadRequest,
    GenerateRequest,
    NativeSampling,
    PauseRequest,
    UpdateWeightsRequest,
    error_body,
    parse,
)

log = logging.getLogger("qatctl.serve")
HEALTH_CHECK_TIMEOUT_S = 20


def _finish(o) -> dict:
    """SGLang's meta_info.finish_reason."""
    if o.finish_reason == "length":
        return {"type": "length", "length": len(o.output_ids)}
    if o.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": o.matched}


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


def register(app, server) -> None:
    """Every native route on `app`, served by `server` (a qatctl.server.Server)."""
    from fastapi.responses import StreamingResponse

    _info_routes(app, server)
    _control_routes(app, server)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(req: GenerateRequest, request: Request):
        req.refuse_unsupported()
        return await server.native(req, request, StreamingResponse)


def _info_routes(app, server) -> None:
    from fastapi.responses import Response

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


def _control_routes(app, server) -> None:
    from fastapi.responses import JSONResponse, Response

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


class NativeRoutes:
    """SGLang's /generate on qatctl.server.Server (a mixin: `self` is the Server)."""

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
            yield f"data: {json.dumps(error_body(str(e), None, 400 if isinstance(e, BadRequest) else 500))}\n\n"
        yield "data: [DONE]\n\n"

