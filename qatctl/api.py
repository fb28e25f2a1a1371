"""Request schemas of `qatctl serve` (pydantic, the FastAPI convention SGLang and vLLM follow),
and their translation to SamplingParams.

Field names and defaults follow SGLang's GenerateReqInput / SamplingParams
(python/sglang/srt/managers/io_struct.py, sampling/sampling_params.py) and the OpenAI schema.
Every field a client may send is declared: one we do not implement is accepted only at the value
that means "off", any other value is a 400 naming it; an unknown field is a 400 naming it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qatctl.errors import QatctlError


class BadRequest(Exception):
    """A 400 naming the bad field (`param`, as OpenAI's error object has it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Overloaded(Exception):
    """A 503: the server's request queue is full."""


def error_body(message: str, param: str | None, code: int, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object (SGLang and vLLM use it on every route)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _off(value, *neutral):
    return value is None or value in neutral or value == {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # fields accepted only at their neutral value: name -> the values that mean "off"
    OFF: ClassVar[dict[str, tuple]] = {}

    def refuse_unsupported(self, where: str = "") -> None:
        for name, neutral in self.OFF.items():
            if not _off(getattr(self, name), *neutral):
                raise BadRequest(f"{where}{name}={getattr(self, name)!r} is not supported by qatctl serve",
                                 f"{where}{name}")


def validation_message(err: dict) -> tuple[str, str]:
    """(message, field) for one pydantic/FastAPI validation error: the field's dotted path first."""
    # drop "body" and pydantic's union-branch tags (NativeSampling, list[int], str, ...): field names
    # are lowercase identifiers or list indices
    loc = [str(p) for p in err["loc"] if p != "body" and (isinstance(p, int) or (
        p.isidentifier() and p.islower() and p not in ("str", "int", "float", "bool", "dict", "list")))]
    field = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"{field} is not a known parameter", field
    if err["type"] == "json_invalid":
        return f"invalid JSON body ({err.get('ctx', {}).get('error', err['msg'])})", "body"
    if not field:
        return f"the JSON body: {err['msg']}", "body"
    return f"{field}: {err['msg']} (got {err.get('input')!r})", field


def parse(model: type[BaseModel], body, where: str = ""):
    """body (a dict) -> model, or a BadRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"{where or 'the JSON body'} must be an object", where or "body")
    try:
        obj = model.model_validate(body)
    except ValidationError as e:
        message, field = validation_message(e.errors()[0])
        raise BadRequest(where + message, where + field) from None
    if isinstance(obj, _Strict):
        obj.refuse_unsupported(where)
    return obj


def _sampling(**kw):
    from qatctl.engines import SamplingParams

    try:
        return SamplingParams(**kw)
    except QatctlError as e:
        raise BadRequest(str(e).removeprefix("sampling: ")) from None


def _bias(logit_bias: dict[str, float] | None) -> tuple:
    out = []
    for k, v in (logit_bias or {}).items():
        try:
            out.append((int(k), float(v)))
        except ValueError:
            raise BadRequest(f"logit_bias key {k!r} is not a token id") from None
    return tuple(sorted(out))


def _stops(stop) -> tuple[str, ...]:
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)


def _seeds(seed: int | None, n: int) -> list[int | None]:
    """Sample j of an n-sample request draws with seed + j, so the n samples differ and each is
    reproducible."""
    return [None if seed is None else seed + j for j in range(n)]


# ------------------------------------------------------------------ SGLang native

class NativeSampling(_Strict):
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1, le=64)
    sampling_seed: int | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    stop_regex: str | list[str] | None = None
    custom_params: dict | None = None
    stream_interval: int | None = None
    OFF: ClassVar[dict[str, tuple]] = {"min_p": (0.0,), "json_schema": (), "regex": (), "ebnf": (), "structural_tag": (), "stop_regex": (),
           "custom_params": (), "stream_interval": (1,)}

    def to_params(self, top_logprobs: int = 0) -> list:
        seed = self.sampling_seed if self.sampling_seed is not None else self.seed
        return [_sampling(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                          max_new_tokens=128 if self.max_new_tokens is None else self.max_new_tokens,
                          min_new_tokens=self.min_new_tokens, stop=_stops(self.stop),
                          stop_token_ids=tuple(self.stop_token_ids or ()), seed=s, ignore_eos=self.ignore_eos,
                          no_stop_trim=self.no_stop_trim, skip_special_tokens=self.skip_special_tokens,
                          spaces_between_special_tokens=self.spaces_between_special_tokens,
                          logit_bias=_bias(self.logit_bias), frequency_penalty=self.frequency_penalty,
                          presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
                          top_logprobs=top_logprobs)
                for s in _seeds(seed, self.n)]


class GenerateRequest(_Strict):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSampling | list[NativeSampling] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = Field(0, ge=0, le=20)
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    log_metrics: bool = True  # no request metrics are kept: either value is honoured
    token_ids_logprob: Any = None
    return_hidden_states: bool = False
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    input_embeds: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    session_params: Any = None
    modalities: Any = None
    OFF: ClassVar[dict[str, tuple]] = {"token_ids_logprob": (), "return_hidden_states": (False,), "image_data": (), "audio_data": (),
           "video_data": (), "input_embeds": (), "lora_path": (), "custom_logit_processor": (),
           "session_params": (), "modalities": ()}

    @field_validator("top_logprobs_num", mode="before")
    @classmethod
    def _none_is_zero(cls, v):
        return 0 if v is None else v

    def refuse_unsupported(self, where: str = "") -> None:
        super().refuse_unsupported(where)
        sps = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params]
        for sp in sps:
            if sp is not None:
                sp.refuse_unsupported(where + "sampling_params.")


class UpdateWeightsRequest(_Strict):
    model_path: str = Field(min_length=1)
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    OFF: ClassVar[dict[str, tuple]] = {"load_format": ("auto",)}

    @field_validator("flush_cache")
    @classmethod
    def _always_flush(cls, v):
        if not v:
            raise ValueError("qatctl serve always flushes its prefix cache on a weight update (its KV "
                             "would be stale)")
        return v


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False


class PauseRequest(_Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


# ------------------------------------------------------------------ OpenAI

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAISampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's records; nothing here depends on it
    # SGLang's extensions of the OpenAI schema
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_token_ids: list[int] | None = None
    OFF: ClassVar[dict[str, tuple]] = {"min_p": (0.0,)}

    def to_params(self, max_new_tokens: int, top_logprobs: int) -> list:
        return [_sampling(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                          max_new_tokens=max_new_tokens, min_new_tokens=min(self.min_tokens, max_new_tokens),
                          stop=_stops(self.stop), stop_token_ids=tuple(self.stop_token_ids or ()), seed=s,
                          ignore_eos=self.ignore_eos, no_stop_trim=self.no_stop_trim,
                          skip_special_tokens=self.skip_special_tokens, logit_bias=_bias(self.logit_bias),
                          frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                          repetition_penalty=self.repetition_penalty, top_logprobs=top_logprobs)
                for s in _seeds(self.seed, self.n)]


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    OFF: ClassVar[dict[str, tuple]] = {**_OpenAISampling.OFF, "suffix": ("",)}

    def refuse_unsupported(self, where: str = "") -> None:
        super().refuse_unsupported(where)
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest(f"best_of={self.best_of} is not supported by qatctl serve (only best_of == n)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None
    reasoning_effort: Any = None
    OFF: ClassVar[dict[str, tuple]] = {**_OpenAISampling.OFF, "tools": ([],), "tool_choice": ("none",), "functions": ([],),
           "function_call": ("none",), "response_format": ({"type": "text"},), "parallel_tool_calls": (),
           "reasoning_effort": ()}
