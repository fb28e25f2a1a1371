"""An engine over HTTP: SGLang's native API (or `qatctl serve`, which speaks the same subset).

    engine = RemoteEngine("http://127.0.0.1:30000", tokenizer=tok)
    engine.update_weights_from_disk("runs/loop/int4-3")
    outs = engine.generate([prompt_ids], SamplingParams(temperature=1.0, seed=7))

generate: POST /generate with `input_ids` (a batch), per-prompt `sampling_params` (the seed
goes as `sampling_seed`), `return_logprob: true`; logprobs come from
`meta_info.output_token_logprobs` ([logprob, token_id, text|null] per token). score: POST
/generate with the prompt + completion as input, `max_new_tokens: 0` and `logprob_start_len`
at the completion, read from `meta_info.input_token_logprobs`.
"""

from __future__ import annotations

from qatctl.engines import Completion, SamplingParams
from qatctl.errors import QatctlError


class RemoteEngine:
    kernel = "remote"

    def __init__(self, url: str, tokenizer=None, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _post(self, route: str, body: dict):
        import httpx

        try:
            r = self.http.post(route, json=body)
        except httpx.HTTPError as e:
            raise QatctlError(f"{self.url}{route}: {e.__class__.__name__}: {e}", exit_code=1) from None
        if r.status_code != 200:
            raise QatctlError(f"{self.url}{route}: HTTP {r.status_code}: {r.text[:300]}", exit_code=1)
        return r.json()

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer)
        size = self.info().get("vocab_size")
        if not isinstance(size, int):
            raise QatctlError(f"{self.url}/get_model_info: no vocab_size", exit_code=1)
        return size

    def update_weights(self, tensors: dict) -> None:
        raise QatctlError(f"{self.url}: a server takes new weights from disk (update_weights_from_disk), "
                          "not from this process's memory")

    def health(self) -> bool:
        import httpx

        try:
            return self.http.get("/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict:
        r = self.http.get("/get_model_info")
        return {"engine": "remote", "url": self.url, **(r.json() if r.status_code == 200 else {})}

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        """Point the server at a checkpoint on its disk (SGLang's route; `weight_version` is the
        label slime sends with each update and the server reports back in meta_info)."""
        import httpx

        body = {"model_path": str(model_path)}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        try:
            r = self.http.post("/update_weights_from_disk", json=body)
        except httpx.HTTPError as e:
            raise QatctlError(f"{self.url}/update_weights_from_disk: {e}", exit_code=1) from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not body.get("success"):
            raise QatctlError(f"{self.url}/update_weights_from_disk {model_path}: "
                              f"{body.get('message', r.text[:300])}", exit_code=1)
        return body.get("message", "")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        tops = {sp.top_logprobs for sp in params}
        if len(tops) > 1:  # SGLang's top_logprobs_num is one per request, not per prompt
            raise QatctlError(f"{self.url}/generate: top_logprobs differs between the prompts of one request "
                              f"({sorted(tops)}); send them as separate calls")
        body = {"input_ids": [list(p) for p in prompts], "sampling_params": [_native(sp) for sp in params],
                "return_logprob": True}
        if top := tops.pop() if tops else 0:
            body["top_logprobs_num"] = top
        out = self._post("/generate", body)
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(prompts):
            raise QatctlError(f"{self.url}/generate: {len(out)} results for {len(prompts)} prompts", exit_code=1)
        return [_completion(p, r, top) for p, r in zip(prompts, out, strict=True)]

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of each completion (the server's input_token_logprobs)."""
        return self._score(prompts, completions, top=False)[0]

    def score_argmax(self, prompts: list[list[int]], completions: list[list[int]]):
        """(logprobs, greedy token per position) from input_token_logprobs and input_top_logprobs
        with top_logprobs_num 1 (SGLang's and qatctl serve's native API)."""
        return self._score(prompts, completions, top=True)

    def _score(self, prompts, completions, top: bool):
        result, tops = [], []
        for p, c in zip(prompts, completions, strict=True):
            if not c:
                result.append([])
                tops.append([])
                continue
            body = {"input_ids": list(p) + list(c), "return_logprob": True, "logprob_start_len": len(p),
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0}}
            if top:
                body["top_logprobs_num"] = 1
            meta = self._post("/generate", body)["meta_info"]
            result.append([lp for lp, _, _ in meta["input_token_logprobs"]][-len(c):])
            if top:
                tops.append([t[0][1] for t in meta["input_top_logprobs"][-len(c):]])
        return result, (tops if top else None)


def _native(sp: SamplingParams) -> dict:
    """Every SamplingParams field in SGLang's native `sampling_params` (top_logprobs goes as the
    request's `top_logprobs_num`): a remote engine samples as the embedded one does."""
    d = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k if sp.top_k > 0 else -1,
         "max_new_tokens": sp.max_new_tokens, "min_new_tokens": sp.min_new_tokens, "ignore_eos": sp.ignore_eos,
         "no_stop_trim": sp.no_stop_trim, "skip_special_tokens": sp.skip_special_tokens,
         "spaces_between_special_tokens": sp.spaces_between_special_tokens,
         "frequency_penalty": sp.frequency_penalty, "presence_penalty": sp.presence_penalty,
         "repetition_penalty": sp.repetition_penalty}
    if sp.stop_token_ids:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.stop:
        d["stop"] = list(sp.stop)
    if sp.seed is not None:
        d["sampling_seed"] = sp.seed
    if sp.logit_bias:
        bias = {str(tok): b for tok, b in sp.logit_bias}
        if len(bias) != len(sp.logit_bias):  # SGLang's is a map: one bias per token id
            raise QatctlError("sampling: logit_bias names a token id twice (a server takes one bias per id)")
        d["logit_bias"] = bias
    return d


def _completion(prompt: list[int], r: dict, top: int) -> Completion:
    """A native /generate result as a Completion: ids, logprobs, finish reason and what matched,
    text, and the per-step top logprobs when asked for."""
    meta = r["meta_info"]
    lps = meta.get("output_token_logprobs") or []
    ids = r.get("output_ids") or [t for _, t, _ in lps]
    fr = meta.get("finish_reason") or {}
    tops = []
    if top:
        tops = [[(t, lp) for lp, t, _ in step] if step is not None else [] for step in meta.get("output_top_logprobs") or []]
    return Completion(prompt_ids=list(prompt), output_ids=list(ids), logprobs=[lp for lp, _, _ in lps],
                      finish_reason=fr.get("type", "length") if isinstance(fr, dict) else str(fr),
                      text=r.get("text", ""), matched=fr.get("matched") if isinstance(fr, dict) else None,
                      top_logprobs=tops)
