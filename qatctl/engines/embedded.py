"""The embedded engine: an in-process Llama / Qwen3 / Qwen3-MoE decoder on a real 4-bit kernel.

Weights of an int4-checkpoint stay 4-bit. On the CPU each target Linear is repacked at load time
for the native W4A16 kernel (qatctl/engines/native.c, compiled for the running CPU: vdpbf16ps on
AVX512-BF16, FMAs on AVX2, plain C elsewhere, the same bits on each), or, without a C compiler
(or with QATCTL_NO_NATIVE=1), for torch's `_weight_int4pack_mm_for_cpu` (symmetric q maps exactly
as u = q + 8, zero 0). Both take BF16 activations and return BF16 values. q/k/v and gate/up are
fused into one kernel call each. Norms, RoPE, attention, softmax and the residual stream run in
fp32. A BF16 engine (weights='bf16') runs torch's BF16 matmul (oneDNN), or, loaded with
exact=True, the W4A16 kernel's arithmetic on the dense BF16 weights (the native W16A16 kernel: BF16
in, the same fp32 chains, BF16 out; batch-invariant, prefill ≡ decode). A decode
step of a dense (non-MoE) model on the native kernels is one native call for all layers
(kernels.DecodePlan), and so is its prefill (the same call over the prompt's tokens: exact); MoE
and the fallback run the torch forward below. Generation runs
as a continuous batch (qatctl/engines/batch.py): a KV pool of one [rows, kv heads, length,
head_dim] tensor per layer, sequences joining and leaving at decode steps, identical prompts
prefilled once (prefix cache, flushed by weight updates).

On CUDA (device auto or cuda) the same code runs on the GPU: the int4 linears on tinygemm
(`_weight_int4pack_mm`, packing proven against the dense matmul at load), the lm_head as fixed
chunks of cuBLAS fp32 matmul; sampling stays on the CPU. Not yet measured on a GPU here, and
batch invariance there is not established.

Batch invariance (CPU): a sequence's tokens and logprobs do not depend on what it is batched with.
The int4 kernels are row-invariant in M; prefill runs each prompt alone; attention runs over each
row's own length (the fused step: one task per row and head; the torch path: rows of equal length
share one call); the lm_head and MoE router run as RowInvariantLinear (the native BF16-read kernel,
or a oneDNN prepacked fp32 linear checked row-invariant at load, else fixed chunks of CHUNK_ROWS
rows, since MKL's sgemm result for a row depends on M); sampling uses a generator per row.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qatctl.engines import ROLLOUT_WIDTH, Completion, SamplingParams
from qatctl.engines.batch import token_logprob, token_logprobs
from qatctl.engines.linears import Bf16Linear, DenseLinear, Int4Linear, RowInvariantLinear
from qatctl.errors import QatctlError
from qatctl.quant import dequant

log = logging.getLogger("qatctl.engine")
SUPPORTED = ("llama", "qwen3", "qwen3_moe")
SCORE_ROWS = 64  # samples of one prompt scored in one KV pool (exact score)
PREFILL_CHUNK = 256  # prompt tokens per native call of an exact prefill (bounds its buffers; the bits do not depend on it)


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin_signed):
    """HF's x * cos + rotate_half(x) * sin, with rotate_half's sign folded into sin_signed
    (= cat(-sin, sin) over the two halves of head_dim): the same products, one op fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class _Weights:
    """The engine's view of a checkpoint's tensors (int4 pack-quantized or dense), read through
    the format's one reader (qatctl.int4format.Int4Reader): from a folder, or from an in-memory
    {on-disk name: tensor} dict (rl-step's weight sync)."""

    def __init__(self, reader, weights: str, device: torch.device, native: bool = True, w16a16: bool = False):
        if weights not in ("int4", "fp32", "bf16"):
            raise QatctlError(f"engine: weights={weights!r}; expected int4, fp32 or bf16")
        if weights == "int4" and not reader.int4:
            raise QatctlError(f"{reader.where}: not an int4-checkpoint (no pack-quantized weights); "
                              "pass weights='fp32' or 'bf16' to run it dense")
        self.reader, self.group_size = reader, reader.group_size
        self.mode, self.device, self.where = weights, device, reader.where
        self.native = native  # the native kernels where they apply (False: the pure-torch path)
        self.w16a16 = w16a16  # BF16 weights on the native W16A16 kernel (an exact engine) instead of torch's matmul
        self.checked = False

    @classmethod
    def from_folder(cls, folder: Path, cfg: dict, weights: str, device: torch.device, native: bool = True,
                    w16a16: bool = False):
        from qatctl.int4format import Int4Reader

        return cls(Int4Reader.from_folder(folder, cfg), weights, device, native, w16a16)

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int | None, weights: str, device: torch.device,
                     native: bool = True, w16a16: bool = False):
        from qatctl.int4format import Int4Reader

        return cls(Int4Reader.from_tensors(tensors, group_size), weights, device, native, w16a16)

    def tensor(self, key):
        return self.reader.tensor(key)

    def vector(self, key):
        """A norm weight etc., fp32 on the engine's device."""
        return self.tensor(key).to(device=self.device, dtype=torch.float32)

    def has(self, key):
        return self.reader.has(key)

    def linear(self, *modules):
        """One linear over the modules' outputs concatenated (fused q/k/v, gate/up)."""
        if all(self.reader.is_quantized(m) for m in modules):
            qs, scales = zip(*(self.reader.q_scale(m) for m in modules), strict=True)
            q, scale = torch.cat(qs), torch.cat(scales)
            if self.mode == "int4":
                check, self.checked = not self.checked, True  # the first one proves the packing
                return Int4Linear(q, scale, self.group_size, self.device, check=check, native=self.native)
            w = dequant(q, scale, self.group_size)  # dense baseline of the same INT4 weights
        else:
            w = torch.cat([self.tensor(f"{m}.weight") for m in modules])
        if self.mode == "bf16" and self.dense_native(w):
            return Bf16Linear(w.to(torch.bfloat16))
        return DenseLinear(w.float(), torch.bfloat16 if self.mode == "bf16" else torch.float32, self.device)

    def dense_native(self, w: torch.Tensor) -> bool:
        """An exact BF16 engine runs the native W16A16 kernel (batch-invariant, prefill ≡ decode) where
        it builds; otherwise BF16 is torch's matmul (oneDNN: the fast baseline the bf16 arm is timed on)."""
        from qatctl.engines import kernels

        return self.w16a16 and self.native and self.device.type == "cpu" and w.shape[1] % 2 == 0 \
            and kernels.available()


class EmbeddedEngine:
    max_running = ROLLOUT_WIDTH  # sequences decoding at once in generate() (rl-step --max-batch); serve's scheduler has its own

    def __init__(self, folder: Path, cfg: dict, w: _Weights, tokenizer, eos_ids: set[int], stepwise: bool = False):
        self.folder, self.cfg, self.tokenizer, self.eos_ids = folder, cfg, tokenizer, eos_ids
        self.device = w.device
        self.model_type = cfg["model_type"]
        self.n_heads, self.n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default"}
        if rope.get("rope_type", "default") != "default":
            raise QatctlError(f"{folder}/config.json: rope_type {rope['rope_type']!r} is not supported")
        self.max_pos = cfg.get("max_position_embeddings", 4096)
        inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        ang = torch.outer(torch.arange(self.max_pos, dtype=torch.float64), inv)
        self.cos = torch.cat([ang, ang], dim=-1).cos().float().to(self.device)
        self.sin_signed = torch.cat([-ang.sin(), ang.sin()], dim=-1).float().to(self.device)
        self.mode, self.group_size, self.native, self.w16a16 = w.mode, w.group_size, w.native, w.w16a16
        from qatctl.engines.batch import PrefixCache

        self.prefix_cache = PrefixCache()
        self._build(w)
        self.stepwise = stepwise and not self.native_exact  # exact prefill on the torch path

    def _build(self, w: _Weights) -> None:
        """Every weight-holding part of the engine from `w` (load and update_weights share it)."""
        cfg = self.cfg
        self.embed = w.vector("model.embed_tokens.weight")
        self.lm_head = RowInvariantLinear(w.tensor("lm_head.weight") if w.has("lm_head.weight") else self.embed,
                                          self.device, native=w.native)
        self.final_norm = w.vector("model.norm.weight")
        self.layers = []
        qk_norm = self.model_type in ("qwen3", "qwen3_moe")
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            if w.has(f"{p}.self_attn.q_proj.bias"):
                raise QatctlError(f"{w.where}: attention biases are not supported by the embedded engine")
            layer = {
                "in_norm": w.vector(f"{p}.input_layernorm.weight"),
                "post_norm": w.vector(f"{p}.post_attention_layernorm.weight"),
                "qkv": w.linear(f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                "o": w.linear(f"{p}.self_attn.o_proj"),
            }
            if qk_norm:
                layer["q_norm"] = w.vector(f"{p}.self_attn.q_norm.weight")
                layer["k_norm"] = w.vector(f"{p}.self_attn.k_norm.weight")
            if w.has(f"{p}.mlp.gate.weight"):  # MoE block
                n_exp = cfg.get("num_experts") or cfg["num_local_experts"]
                layer["router"] = RowInvariantLinear(w.tensor(f"{p}.mlp.gate.weight"), self.device, native=w.native)
                layer["experts"] = [(w.linear(f"{p}.mlp.experts.{e}.gate_proj", f"{p}.mlp.experts.{e}.up_proj"),
                                     w.linear(f"{p}.mlp.experts.{e}.down_proj")) for e in range(n_exp)]
                layer["top_k"], layer["norm_topk"] = cfg["num_experts_per_tok"], cfg.get("norm_topk_prob", True)
            else:
                layer["gate_up"] = w.linear(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")
                layer["down"] = w.linear(f"{p}.mlp.down_proj")
            self.layers.append(layer)
        first = self.layers[0]["qkv"]
        self.kernel = first.kernel
        from qatctl.engines.kernels import DecodePlan

        self.decode_plan = DecodePlan.plan(self) if w.native else None  # the fused native decode step, where it applies
        self.weight_bytes = sum(lin.nbytes for layer in self.layers for lin in _linears(layer))

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path, weights: str = "int4", device: str = "auto", tensors: dict | None = None,
             group_size: int | None = None, kernel: str = "auto", exact: bool = False):
        """weights: 'int4' (the 4-bit kernel; needs an int4-checkpoint), or 'fp32' / 'bf16' to run
        any HF folder dense (an int4-checkpoint is then dequantized: a baseline, never the default).
        device: auto (CUDA when present), cpu or cuda. `tensors` (with `group_size` for int4) gives
        the weights from memory, as update_weights takes them; the folder then supplies only the
        config and tokenizer. kernel: 'auto' (the native kernels where they apply), 'native'
        (an error where they cannot build) or 'torch' (the pure-torch path: aten int4, oneDNN).
        exact: prefill ≡ decode wherever the engine runs (see `exact`); native engines always are."""
        from transformers import GenerationConfig

        from qatctl.engines import kernels

        if kernel not in ("auto", "native", "torch"):
            raise QatctlError(f"engine: kernel={kernel!r}; expected auto, native or torch")
        if kernel == "native" and not kernels.available():
            raise QatctlError("engine: kernel='native' but the native kernels are unavailable on this machine "
                              "(no C compiler, a failed build, or QATCTL_NO_NATIVE=1)")

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise QatctlError(f"{folder}: not a model folder (no config.json)")
        from qatctl.safeio import read_json

        cfg = read_json(folder / "config.json")
        if not isinstance(cfg, dict) or cfg.get("model_type") not in SUPPORTED:
            raise QatctlError(f"{folder}/config.json: model_type {(cfg or {}).get('model_type')!r} is not supported by the "
                              f"embedded engine ({', '.join(SUPPORTED)})")
        t0 = time.perf_counter()
        from qatctl.engines import resolve_device

        dev = resolve_device(device)
        native = kernel != "torch"
        w16a16 = exact and weights == "bf16"
        w = (_Weights.from_folder(folder, cfg, weights, dev, native, w16a16) if tensors is None
             else _Weights.from_tensors(tensors, group_size, weights, dev, native, w16a16))
        from qatctl.safeio import load_tokenizer

        tokenizer = load_tokenizer(folder)
        eos = cfg.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if (folder / "generation_config.json").is_file():
            g = GenerationConfig.from_pretrained(folder).eos_token_id
            eos_ids |= set(g if isinstance(g, list) else [g] if g is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        engine = cls(folder, cfg, w, tokenizer, eos_ids, stepwise=exact)
        log.info("loaded %s on %s (%s weights, kernel %s, lm_head %s) in %.1fs", folder, engine.device, weights,
                 engine.kernel, engine.lm_head.kernel, time.perf_counter() - t0)
        return engine

    # ------------------------------------------------------------------ model

    def _attn_mlp(self, layer, x, rope, cache, rows, lengths):
        """One decoder layer over x [B, T, H]: x's row i is cache row rows[i], whose cache gets T
        new entries at lengths[i]."""
        B, T, _ = x.shape
        h = _rms_norm(x, layer["in_norm"], self.eps)
        qkv = layer["qkv"](h)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qk = qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd)
        if "q_norm" in layer:
            q, k = qk.split([nh, nkv], dim=2)
            qk = torch.cat([_rms_norm(q, layer["q_norm"], self.eps), _rms_norm(k, layer["k_norm"], self.eps)], dim=2)
        qk = _rotate(qk, *rope).transpose(1, 2)  # q and k heads share the rotation: one pass for both
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd).transpose(1, 2)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:  # every row at the same length (batch 1, GRPO samples of one prompt)
            out = _attend(q, k, v, cache, rows, lengths[0])
        else:
            out = torch.empty(B, nh, T, hd, device=x.device)
            for start, idx in groups.items():  # rows of equal length attend in one call
                out[idx] = _attend(q[idx], k[idx], v[idx], cache, [rows[i] for i in idx], start)
        x = x + layer["o"](out.transpose(1, 2).reshape(B, T, nh * hd))
        h = _rms_norm(x, layer["post_norm"], self.eps)
        return x + (self._moe(layer, h) if "router" in layer else self._mlp(layer["gate_up"], layer["down"], h))

    @staticmethod
    def _mlp(gate_up, down, h):
        g, u = gate_up(h).chunk(2, dim=-1)
        return down(F.silu(g) * u)

    def _moe(self, layer, h):
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        probs = torch.softmax(layer["router"](flat), dim=-1)
        weights, experts = probs.topk(layer["top_k"], dim=-1)
        if layer["norm_topk"]:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():  # ascending expert order: a token's sum order is fixed
            rows, slot = (experts == e).nonzero(as_tuple=True)
            y = self._mlp(*layer["experts"][e], flat[rows])
            out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(-1))
        return out.reshape(shape)

    def _forward(self, tokens, positions, cache, rows, lengths):
        x = self.embed[tokens]
        rope = self.cos[positions].unsqueeze(2), self.sin_signed[positions].unsqueeze(2)  # [B, T, 1, hd]
        for i, layer in enumerate(self.layers):
            x = self._attn_mlp(layer, x, rope, cache[i], rows, lengths)
        return _rms_norm(x, self.final_norm, self.eps)

    def _decode(self, tokens: list[int], cache, pool, rows: list[int], lengths: list[int]) -> torch.Tensor:
        """One decode step: token m of row rows[m] at position lengths[m] -> next-token logits [M, V].
        The fused native step where the engine has one (pool: decode_plan.pool(cache)), else the
        torch forward."""
        t = torch.tensor(tokens, device=self.device)
        if pool is not None:
            out = self.decode_plan(self.embed[t], pool, rows, lengths)
            return out if self.decode_plan.vocab else self._logits(_rms_norm(out, self.final_norm, self.eps))
        pos = torch.tensor(lengths, device=self.device).unsqueeze(1)
        return self._logits(self._forward(t.unsqueeze(1), pos, cache, rows, lengths)[:, -1])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def _new_cache(self, rows: int, length: int):
        """Per layer (K, V), each [rows, kv heads, length, head_dim]: row b is one sequence."""
        shape = (rows, self.n_kv, length, self.head_dim)
        return [(torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device))
                for _ in self.layers]

    @property
    def native_exact(self) -> bool:
        """The fused native forward (qatctl_decode, lm_head included) runs decode steps and prefill."""
        return self.decode_plan is not None and bool(self.decode_plan.vocab)

    @property
    def exact(self) -> bool:
        """Prefill ≡ decode: every position's logits are the same bits whether the position was
        prefilled, decoded or scored. Native engines are exact (their prefill is the decode step's
        native forward over the prompt's tokens); others when loaded with exact=True (their prefill
        runs the torch decode step one position at a time: exact, and T calls slower)."""
        return self.native_exact or self.stepwise

    def _prefill(self, ids: list[int], cache, row: int, start: int) -> torch.Tensor:
        """Run ids (positions 0..T-1) into cache row `row`; the next-token logits [T - start, V] of
        positions start..T-1. Exact engines run the decode step's own native forward over the
        prompt's tokens (PREFILL_CHUNK per call; positions before `start` skip the lm_head), or
        (stepwise) its torch decode step position by position; the others the torch forward
        (SDPA, its own reduction orders)."""
        T = len(ids)
        if not self.native_exact:
            if self.stepwise:  # the decode step itself, one position at a time (the lm_head only from `start`)
                for p in range(start):
                    self._forward(torch.tensor([[ids[p]]], device=self.device), torch.tensor([[p]], device=self.device),
                                  cache, [row], [p])
                out = [self._decode([ids[p]], cache, None, [row], [p]) for p in range(start, T)]
                return torch.cat(out) if out else torch.empty(0, self.vocab_size)
            t = torch.tensor([ids], device=self.device)
            h = self._forward(t, torch.arange(T, device=self.device).unsqueeze(0), cache, [row], [0])[0]
            return self._logits(h[start:])
        plan, x = self.decode_plan, self.embed[torch.tensor(ids)]
        pool = plan.pool(cache)
        out = []
        for a in range(0, T, PREFILL_CHUNK):
            b = min(T, a + PREFILL_CHUNK)
            mid = min(max(a, start), b)
            if mid > a:
                plan(x[a:mid], pool, [row] * (mid - a), list(range(a, mid)), head=False)
            if b > mid:
                out.append(plan(x[mid:b], pool, [row] * (b - mid), list(range(mid, b))))
        return torch.cat(out) if out else torch.empty(0, self.vocab_size)

    @torch.inference_mode()
    def trace_divergence(self, ids: list[int], position: int) -> str | None:
        """Where this engine's exact prefill and its decode step first differ for the logits at
        `position` of `ids` (a debugging aid for --true-on-policy's exit 1): 'model.layers.N' (the first
        layer whose output differs), 'lm_head', or None when they agree all the way (or the engine
        has no native step to trace). Positions 0..position are run both ways, layer by layer."""
        plan = self.decode_plan
        if plan is None or not 0 <= position < len(ids):
            return None
        T = position + 1
        x = self.embed[torch.tensor(ids[:T])]

        def both(**kw):
            caches = self._new_cache(1, T), self._new_cache(1, T)  # held here: the pools are raw pointers into them
            whole = plan(x, plan.pool(caches[0]), [0] * T, list(range(T)), **kw)[-1]
            pool = plan.pool(caches[1])
            for p in range(T):
                step = plan(x[p:p + 1], pool, [0], [p], **kw)[-1]
            return whole, step

        for n in range(1, len(self.layers) + 1):
            if not torch.equal(*both(layers=n)):
                return f"model.layers.{n - 1}"
        return "lm_head" if plan.vocab and not torch.equal(*both()) else None

    # ------------------------------------------------------------------ interface

    def open_batch(self):
        """A continuous batch on this engine (qatctl/engines/batch.py): sequences join with
        add(), step() decodes one token for all of them; the server's scheduler drives one."""
        from qatctl.engines.batch import DecodeBatch

        return DecodeBatch(self)

    def flush_cache(self) -> int:
        """Drop the prefix cache (cached prompts' KV); returns how many prompts it held."""
        return self.prefix_cache.flush()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_token=None) -> list[Completion]:
        """All prompts through one continuous batch: at most `max_running` decode at once, the rest
        join as rows finish (a long completion never holds up the others). on_token(i, token_id,
        logprob), if given, is called as each token of prompt i is sampled. Identical prompts (a
        GRPO group) are prefilled once."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise QatctlError(f"generate: {len(params)} sampling params for {len(prompts)} prompts")
        import time

        batch = self.open_batch()
        seqs: list = [None] * len(prompts)
        waiting = list(range(len(prompts)))
        waiting.reverse()
        prefill = decode = 0.0
        while waiting or batch.running:
            t = time.perf_counter()
            while waiting and len(batch.running) < self.max_running:
                i = waiting.pop()
                cb = None if on_token is None else (lambda t, lp, _top, i=i: on_token(i, t, lp))
                try:
                    seqs[i] = batch.add(prompts[i], params[i], on_token=cb)
                except QatctlError as e:
                    raise QatctlError(f"{e} (prompt {i})") from None
            t2 = time.perf_counter()
            prefill += t2 - t
            if batch.running:
                batch.step()
            decode += time.perf_counter() - t2
        # where the last generate call's time went (prefill: prompts joining, the prefix cache
        # included; decode: the batched steps, sampling included): RL's per-phase ledger reads it
        self.last_timings = {"prefill": prefill, "decode": decode}
        return [s.completion for s in seqs]

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of each completion given its prompt (one pass per sequence)."""
        return self.score_argmax(prompts, completions)[0]

    @torch.inference_mode()
    def score_argmax(self, prompts: list[list[int]], completions: list[list[int]]):
        """(score's logprobs, the greedy (argmax) token at each position)."""
        if len(prompts) != len(completions):
            raise QatctlError(f"score: {len(prompts)} prompts for {len(completions)} completions")
        if self.native_exact:
            return self._score_native(prompts, completions)
        result, tops = [], []
        for p, c in zip(prompts, completions, strict=True):
            if not c:
                result.append([])
                tops.append([])
                continue
            ids = list(p) + list(c)
            if len(ids) > self.max_pos:
                raise QatctlError(f"score: {len(ids)} tokens exceed the model's {self.max_pos} positions")
            logits = self._prefill(ids[:-1], self._new_cache(1, len(ids) - 1), 0, len(p) - 1).cpu()
            result.append([token_logprob(row, tok) for row, tok in zip(logits, c, strict=True)])
            tops.append(logits.argmax(-1).tolist())
        return result, tops

    def _score_native(self, prompts, completions):
        """score_argmax on the exact native forward, a prompt's samples together: the prompt runs
        once (its K/V copied to every sample's row), then the samples' completion tokens go
        through shared calls of the decode step. Each position's logits are the bits of any other
        exact path (row-, call- and batch-invariant), at a fraction of the per-sequence cost for a
        GRPO group (one prompt, many samples)."""
        result, tops = [None] * len(prompts), [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            n = len(p) + len(c)
            if n > self.max_pos:
                raise QatctlError(f"score: {n} tokens exceed the model's {self.max_pos} positions")
            if not c:
                result[i], tops[i] = [], []
            elif not p:
                raise QatctlError(f"score: prompt {i} is empty (a completion's first token needs a prompt token)")
            else:
                groups.setdefault(tuple(p), []).append(i)
        plan = self.decode_plan
        # at most SCORE_ROWS samples share one prompt's KV pool (bounds its memory)
        chunks = [(p, m[a:a + SCORE_ROWS]) for p, m in groups.items() for a in range(0, len(m), SCORE_ROWS)]
        for p, members in chunks:
            P = len(p)
            cache = self._new_cache(len(members), P + max(len(completions[i]) for i in members) - 1)
            first = self._prefill(list(p), cache, 0, P - 1)[0].cpu()  # the last prompt position's logits, shared
            for k, v in cache:  # the prompt's K/V, the same bits in every sample's row
                k[1:, :, :P] = k[:1, :, :P]
                v[1:, :, :P] = v[:1, :, :P]
            pool = plan.pool(cache)
            todo = [(row, P + j, tok) for row, i in enumerate(members) for j, tok in enumerate(completions[i][:-1])]
            rows_logits: list[list[torch.Tensor]] = [[first] for _ in members]
            for a in range(0, len(todo), PREFILL_CHUNK):
                part = todo[a:a + PREFILL_CHUNK]
                x = self.embed[torch.tensor([t for _, _, t in part])]
                out = plan(x, pool, [r for r, _, _ in part], [q for _, q, _ in part]).cpu()
                for (r, _, _), row in zip(part, out, strict=True):
                    rows_logits[r].append(row)
            for r, i in enumerate(members):
                logits = rows_logits[r]
                result[i] = [token_logprob(row, tok) for row, tok in zip(logits, completions[i], strict=True)]
                tops[i] = [int(row.argmax()) for row in logits]
        return result, tops

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top_n: int = 0):
        """(logprob of ids[i] given ids[:i], and its top-N [(id, logprob)] or None) for i >= 1: the
        server's input_token_logprobs and OpenAI's echo."""
        if len(ids) > self.max_pos:
            raise QatctlError(f"prompt_logprobs: {len(ids)} tokens exceed the model's {self.max_pos} positions")
        if len(ids) < 2:
            return [], []
        logits = self._prefill(ids[:-1], self._new_cache(1, len(ids) - 1), 0, 0).cpu()
        lps = [token_logprobs(row) for row in logits]  # one log-softmax per position, as sampling computes it
        got = [float(lp[tok]) for lp, tok in zip(lps, ids[1:], strict=True)]
        if not top_n:
            return got, [None] * len(got)
        tops = [lp.topk(top_n) for lp in lps]
        return got, [list(zip(t.indices.tolist(), t.values.tolist(), strict=True)) for t in tops]

    def update_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Swap in new weights from memory: {on-disk name: tensor}, exactly what the checkpoint's
        safetensors would hold (pack-quantized names for an int4 engine, from the shared quantizer
        via qatctl.int4format.int4_tensors; dense BF16 for a bf16/fp32 engine). Bit-identical to
        loading that checkpoint from disk: the same _build reads both. The engine keeps its mode."""
        self._swap(_Weights.from_tensors(tensors, self.group_size, self.mode, self.device, self.native, self.w16a16))

    SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim", "vocab_size", "num_experts", "num_local_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "tie_word_embeddings")

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        """Load another checkpoint of the same architecture in place (SGLang's route of that name;
        a server instead swaps whole engines, so the model may change there). The engine keeps its
        mode, kernel choice and device; `weight_version` is a server's label and not kept here."""
        from qatctl.safeio import read_json

        folder = Path(model_path)
        if not (folder / "config.json").is_file():
            raise QatctlError(f"{folder}: not a model folder (no config.json)")
        cfg = read_json(folder / "config.json")
        differs = [k for k in self.SHAPE_KEYS if (cfg or {}).get(k) != self.cfg.get(k)]
        if differs:
            raise QatctlError(f"{folder}/config.json: {differs[0]} {(cfg or {}).get(differs[0])!r} differs from the "
                              f"engine's {self.cfg.get(differs[0])!r} (load a new engine for another architecture)")
        w = _Weights.from_folder(folder, cfg, self.mode, self.device, self.native, self.w16a16)
        if w.group_size != self.group_size:
            raise QatctlError(f"{folder}: group size {w.group_size} differs from the engine's {self.group_size}")
        self._swap(w)
        self.folder = folder
        return f"Succeeded to update model weights from {model_path}"

    def _swap(self, w: _Weights) -> None:
        """Rebuild every weight-holding part from `w`; on any failure the engine stays as it was."""
        w.checked = True  # the kernel's packing was proven when the engine loaded
        old = {k: getattr(self, k) for k in ("embed", "lm_head", "final_norm", "layers", "kernel", "weight_bytes")}
        try:
            self._build(w)
        except Exception:
            self.__dict__.update(old)  # a failed update leaves the engine as it was
            raise
        if self.embed.shape != old["embed"].shape:
            self.__dict__.update(old)
            raise QatctlError(f"update_weights: vocab/hidden {tuple(w.tensor('model.embed_tokens.weight').shape)} "
                              f"differs from the engine's {tuple(old['embed'].shape)}")
        self.prefix_cache.flush()  # cached prompts' KV came from the old weights

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    def info(self) -> dict:
        return {"engine": "embedded", "model": str(self.folder), "model_type": self.model_type,
                "vocab_size": self.vocab_size,
                "kernel": self.kernel, "weight_bytes": self.weight_bytes,
                "lm_head_bytes": self.lm_head.nbytes, "lm_head_kernel": self.lm_head.kernel, "threads": torch.get_num_threads(),
                "device": str(self.device), "exact": self.exact, "max_running": self.max_running, "prefix_cache_prompts": len(self.prefix_cache.entries),
                "prefix_cache_bytes": self.prefix_cache.bytes}


def _attend(q, k, v, cache, rows, start):
    """Write rows' T new k/v at `start` into the layer's cache, then SDPA of their queries over
    the first start + T entries. Rows that are consecutive in the cache (batch 1, a batch before
    any row finishes) are a view of it: no gather."""
    K, V = cache
    T = q.shape[2]
    end = start + T
    if rows == list(range(rows[0], rows[0] + len(rows))):
        sel = slice(rows[0], rows[0] + len(rows))
    else:
        sel = torch.tensor(rows, device=K.device)
    K[sel, :, start:end] = k
    V[sel, :, start:end] = v
    kk, vv = K[sel, :, :end], V[sel, :, :end]
    if T == 1 and q.device.type == "cpu":
        return _decode_attention(q, kk, vv)
    return F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1 and start == 0,
                                          attn_mask=_prefix_causal(T, start, q.device) if T > 1 and start else None,
                                          enable_gqa=True)


def _decode_attention(q, k, v):
    """One query per row over its keys, as matmul -> softmax -> matmul with the GQA groups as a
    view. CPU SDPA is not batch-invariant with 2+ threads (it splits the keys across threads by
    batch size: a row's bits changed with the rows beside it); these batched matmuls compute each
    row alone and are (tests/test_engine.py), and are faster at decode sizes."""
    B, H, T, D = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, kv, H // kv * T, D), k.transpose(-1, -2)) * (D ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, T, D)


def _linears(layer):
    for key in ("qkv", "o", "gate_up", "down"):
        if key in layer:
            yield layer[key]
    for pair in layer.get("experts", ()):
        yield from pair


def _prefix_causal(T, start, device):
    """Mask for T new queries after `start` cached keys: each sees the prefix and its causal part."""
    m = torch.ones(T, start + T, dtype=torch.bool, device=device)
    m[:, start:] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return m
