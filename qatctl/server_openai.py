"""The OpenAI routes of `qatctl serve`: /v1/models, /v1/completions and /v1/chat/completions
(streamed or not, logprobs and top_logprobs, echo, n, stream_options.include_usage) in the OpenAI
schema (request schemas in qatctl/api.py). `OpenAIRoutes` holds their logic as methods of
qatctl.server.Server.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.
import asyncio
import json
import time
import uuid

from fastapi import Request

from qatctl.api import BadRequest, ChatRequest, CompletionRequest, error_body


def register(app, server) -> None:
    """Every OpenAI route on `app`, served by `server` (a qatctl.server.Server)."""
    from fastapi.responses import StreamingResponse

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "qatctl",
                                            "root": server.model_path, "max_model_len": server.engine.max_pos}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.refuse_unsupported()
        return await server.openai_completions(req, request, StreamingResponse)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        req.refuse_unsupported()
        return await server.openai_chat(req, request, StreamingResponse)


class OpenAIRoutes:
    """The OpenAI routes' logic on qatctl.server.Server (a mixin: `self` is the Server)."""

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

    async def _completion_prompts(self, p) -> list[list[int]]:
        """OpenAI's `prompt`: a string, a list of strings, token ids, or lists of token ids."""
        if isinstance(p, str):
            return await self.tokenize([p])
        if p and isinstance(p[0], int):
            return [p]
        if p and isinstance(p[0], str):
            self._room(len(p))
            return await self.tokenize(p)
        if p and isinstance(p[0], list):
            return p
        raise BadRequest("prompt must be a string, a list of strings, or token-id list(s)", "prompt")

    async def openai_completions(self, req: CompletionRequest, request, StreamingResponse):
        prompts = await self._completion_prompts(req.prompt)
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
        s = _Stream(self, req, chat, [i for i, _, _ in jobs])
        tasks = [asyncio.create_task(s.run(*job)) for job in jobs]
        try:
            if chat:
                yield s.event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i, _, _ in jobs])
            open_ = len(jobs)
            while open_:
                index, kind, item, sent = await s.queue.get()
                if kind == "end":
                    open_ -= 1
                elif kind == "error":
                    yield f"data: {json.dumps(error_body(item, None, 400))}\n\n"
                    break
                elif kind == "token":
                    if s.want_lp:
                        s.pending[index].append(item)
                else:
                    yield s.event([s.choice(index, kind, item, sent)])
            if s.usage_on:
                yield s.event([], {"prompt_tokens": prompt_tokens, "completion_tokens": s.completion_tokens,
                                   "total_tokens": prompt_tokens + s.completion_tokens,
                                   "prompt_tokens_details": {"cached_tokens": s.cached}})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()


class _Stream:
    """One OpenAI stream's state: its id, the queue its choices' producers feed ((index, kind,
    item, text sent so far); kind token, text, done, error or end), the logprobs not yet sent per
    choice, and the usage counted so far."""

    def __init__(self, server, req, chat: bool, indices: list[int]):
        self.server, self.chat = server, chat
        self.cid, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.usage_on = bool(req.stream_options and req.stream_options.include_usage)
        self.want_lp = bool(req.logprobs) if chat else req.logprobs is not None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: dict[int, list] = {i: [] for i in indices}
        self.completion_tokens = self.cached = 0

    def event(self, choices, usage=None) -> str:
        body = {"id": self.cid, "object": self.obj, "created": self.created, "model": self.server.model_name,
                "choices": choices}
        if self.usage_on:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def run(self, index, ids, sp) -> None:
        """Feed one choice's tokens, text and result into the queue."""
        try:
            sent = ""
            async for kind, item in self.server._tokens(ids, sp):
                await self.queue.put((index, kind, item, sent))
                if kind == "text":
                    sent = item
        except Exception as e:  # noqa: BLE001 - reported in the stream, which then ends
            await self.queue.put((index, "error", str(e), ""))
            return
        await self.queue.put((index, "end", None, ""))

    def choice(self, index: int, kind: str, item, sent: str) -> dict:
        """The chunk's choice for a 'text' (the text so far) or 'done' (the Result) item."""
        if kind == "text":
            delta, finish = item[len(sent):], None
        else:
            o = item.completion
            self.completion_tokens += len(o.output_ids)
            self.cached += item.cached_tokens
            delta = o.text[len(sent):] if o.text.startswith(sent) else ""
            finish = o.finish_reason
        lp = self._logprobs(index)
        if self.chat:
            return {"index": index, "delta": {"content": delta} if delta or finish is None else {},
                    "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": delta, "logprobs": lp, "finish_reason": finish}

    def _logprobs(self, index: int):
        """The logprobs of the choice's tokens sampled since its last chunk (None when not asked)."""
        toks, piece = self.pending[index], self.server.piece
        if not (self.want_lp and toks):
            return None
        self.pending[index] = []
        if self.chat:
            return {"content": [self.server._chat_lp(t, v, top) for t, v, top in toks]}
        return {"tokens": [piece(t) for t, _, _ in toks], "token_logprobs": [v for _, v, _ in toks],
                "top_logprobs": [None if top is None else {piece(i): v for i, v in top} for _, _, top in toks]}
