"""The optimizer step shared by train-sft-qat and rl-step: plain torch or DeepSpeed.

    trainer = make_trainer(model, OptimSettings(...), total_steps, deepspeed_config=None)
    stats = trainer.step(micro_batches, loss_fn)   # loss_fn(model, micro_batch) -> (loss, info)

One optimizer step = forward/backward over every micro-batch (gradient accumulation), clip,
AdamW, LR schedule. The loss a loss_fn returns must already be normalized for the whole step
(e.g. summed over the step's tokens and divided by their count), so gradients add up the same
way whatever the micro-batch size or the number of DeepSpeed ranks.

Fake quant runs once per optimizer step: the step runs under `parametrize.cached()`, so every
target weight is fake-quantized at its first use and the cached w_hat serves every micro-batch
(the STE backward is the identity or a mask, so backpropagating through it once per
micro-batch is exact).

Checkpoints (`save_state` / `load_state`) hold fp32 masters, optimizer, scheduler and RNG
states as safetensors + JSON (qatctl/state.py: no pickle is ever loaded); the numbered step
folders, resume and metrics.jsonl of a run live in qatctl/trainrun.py, for both stages.

Memory: a CPU step allocates logits- and embedding-sized tensors (~100 MB each) afresh every
micro-batch. glibc serves blocks that large with mmap and unmaps them on free, so every step
page-faults them in again; with the fake-quant w_hat copies live that cost 1.38x per step
(bench/train.py). `keep_freed_memory()` (called by every Trainer) makes glibc keep freed
blocks in the heap for reuse instead. Set QATCTL_KEEP_FREED_MEMORY=0 to leave glibc as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from qatctl import state
from qatctl.errors import QatctlError


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    max_grad_norm: float = 1.0  # 0 disables clipping
    compute_dtype: str = "auto"  # matmuls of the training forward/backward: auto, fp32 or bf16 (autocast)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at step total - 1."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def device_and_dtype(device: str) -> tuple[torch.device, torch.dtype]:
    """CPU: fp32 masters and compute (BF16 matmul is far slower on AVX2). CUDA: BF16 masters."""
    from qatctl.engines import resolve_device

    dev = resolve_device(device)
    return dev, (torch.float32 if dev.type == "cpu" else torch.bfloat16)


COMPUTE_DTYPES = ("auto", "fp32", "bf16")
_warned: list = []


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies BF16 in hardware (AVX512-BF16 or AMX-BF16), read at run time."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[-1].split()))


def resolve_compute_dtype(choice: str, device: torch.device) -> str:
    """'fp32' or 'bf16'. auto: bf16 on CUDA (BF16 masters), fp32 on CPU (today's exact numerics).
    bf16 on CPU is autocast over fp32 masters: 1.5-1.9x faster fwd+bwd on an AVX512-BF16 CPU
    (bench/train.py), much slower on a CPU without BF16 instructions, which is logged."""
    if choice not in COMPUTE_DTYPES:
        raise QatctlError(f"--compute-dtype {choice!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    resolved = ("bf16" if device.type == "cuda" else "fp32") if choice == "auto" else choice
    if resolved == "fp32" and device.type == "cuda":
        raise QatctlError("--compute-dtype fp32: on CUDA qatctl trains BF16 masters; use auto or bf16")
    if resolved == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and not _warned:
        from qatctl.ui import console

        _warned.append(True)
        console.log("--compute-dtype bf16: this CPU has no AVX512-BF16/AMX instructions; BF16 matmuls "
                    "will be slower than fp32 here")
    return resolved


@contextlib.contextmanager
def compute_context(model, compute_dtype: str, device: torch.device):
    """The precision the training forward runs in. bf16: torch.autocast (masters and optimizer
    stay fp32; norms, softmax and the loss stay fp32). On CPU the lm_head stays an fp32 matmul of
    the fp32 hidden state with the BF16 weights, as the CPU engine's lm_head computes it: a BF16
    lm_head doubles the train/rollout logprob gap there (measured 0.0032 vs 0.0023 mean |dlogp|
    on SmolLM2, fp32 compute 0.0019)."""
    if compute_dtype != "bf16":
        yield
        return
    head = model.get_output_embeddings() if device.type == "cpu" else None
    if head is None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    own = head.__dict__.get("forward")  # an instance-level forward someone else set, if any
    bound = head.forward

    def fp32_forward(x, *args, **kwargs):
        with torch.autocast(device.type, enabled=False):
            return bound(x.float(), *args, **kwargs)

    head.forward = fp32_forward
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        if own is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = own


def dist_env() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (deepspeed / torchrun set them)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> None:
    """The DeepSpeed process group (gloo on CPU, nccl on CUDA), once per process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def end_distributed() -> None:
    """Destroy the process group after a stage that ended well, while the interpreter is whole.

    A process that exits with gloo's worker threads still alive aborts in finalization
    ("terminate called without an active exception", SIGABRT on some rank, seen in CI after a
    resumed ZeRO-3 run had written its artifact). Not after an error: a rank still inside a
    collective would make the others wait here forever.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """All ranks meet here (nothing without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed large blocks instead of unmapping them (see the module doc).

    mallopt(M_MMAP_MAX, 0) serves large allocations from the heap; M_TRIM_THRESHOLD keeps freed
    heap memory in the process. Returns whether it took effect (False off glibc, or when
    QATCTL_KEEP_FREED_MEMORY=0).
    """
    if os.environ.get("QATCTL_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class Trainer:
    """Plain torch: AdamW + warmup/cosine LambdaLR + clip_grad_norm_."""

    backend = "torch"
    # The fake-quant weights computed once per step and reused by every micro-batch's forward
    # and backward (parametrize.cached). Not under ZeRO-3: there a master is gathered for a
    # forward and partitioned again after its backward, so a second micro-batch's backward
    # through the cached weight would reach a master of size 0; each forward recomputes it.
    cache_weights = True

    def __init__(self, model, settings: OptimSettings, total_steps: int, micro_batches_per_step: int):
        self.model, self.settings = model, settings
        self.rank, self.world = 0, 1
        self.accum = micro_batches_per_step
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, settings.warmup_steps, total_steps, settings.min_lr_ratio))
        self.device = next(model.parameters()).device
        self.compute_dtype = resolve_compute_dtype(settings.compute_dtype, self.device)
        self.steps_done = 0
        keep_freed_memory()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def compute(self):
        """Context of every training-side forward (the update's, and scoring-only passes)."""
        return compute_context(self.model, self.compute_dtype, self.device)

    @property
    def forward_module(self):
        """What a loss_fn calls for its forward pass (the DeepSpeed engine wraps the model)."""
        return self.model

    def shard(self, items: list) -> list:
        """This rank's share of a step's micro-batches (all of them without DeepSpeed)."""
        return items[self.rank::self.world]

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, micro_batches: list, loss_fn) -> dict:
        """One optimizer step over this rank's micro-batches; returns loss, grad norm, LR used."""
        lr = self.lr()
        total, infos = 0.0, []
        with parametrize.cached() if self.cache_weights else contextlib.nullcontext():
            mine = self.shard(micro_batches)
            for i, mb in enumerate(mine):
                self._micro_batch(i, len(mine))
                with self.compute():
                    loss, info = loss_fn(self.forward_module, mb)
                if not torch.isfinite(loss.detach()).all():
                    raise QatctlError(f"the loss is {float(loss.detach())} (non-finite) at optimizer step "
                                      f"{self.steps_done + 1}; nothing was committed, the last resume state is intact",
                                      exit_code=1)
                self._backward(loss)
                total += float(loss.detach())
                infos.append(info)
        grad_norm = self._update()
        self.steps_done += 1
        return {"loss": self.reduce_sum(total), "grad_norm": grad_norm, "lr": lr, "infos": infos}

    def _micro_batch(self, index: int, count: int) -> None:
        """Before micro-batch `index` of this rank's `count` in one step."""

    def _backward(self, loss):
        loss.backward()

    def _update(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(norm):  # stepping would write NaN into every master
            self.optimizer.zero_grad(set_to_none=True)
            raise QatctlError(f"the gradient norm is {norm} at optimizer step {self.steps_done + 1}; nothing was "
                              "committed, the last resume state is intact", exit_code=1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def reduce_sum(self, x: float) -> float:
        return x

    def gather_weights(self):
        """After the last step: the model with every parameter whole (every rank must call it)."""
        return self.model

    def full_weights(self):
        """Context in which every parameter is whole, between steps (every rank enters it)."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass

    # ------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path, meta: dict) -> None:
        """Write step state into folder (created here) as safetensors + JSON (qatctl/state.py);
        state.json last marks it complete."""
        state.save_state(folder, self.model, self.optimizer, self.scheduler, meta)

    def load_state(self, folder: Path, require: tuple[str, ...] = ()) -> dict:
        return state.load_state(folder, self.model, self.optimizer, self.scheduler, require=require)


class DeepSpeedTrainer(Trainer):
    """The same step under a DeepSpeed engine (ZeRO 0-3), one process per rank.

    Launched by `deepspeed` or `torchrun`; on a machine without CUDA it runs DeepSpeed's CPU
    accelerator with gloo. The engine averages gradients over ranks and divides the loss by its
    accumulation steps, so each rank's loss is scaled back up to keep the step's sum. The forward
    pass goes through the engine (`forward_module`): its output hooks run DeepSpeed's backward
    prologue, without which ZeRO-3 accumulates micro-batch gradients wrongly (measured: grad norm
    off by ~sqrt(2) over 2 ranks x 2 micro-batches, right with one micro-batch per rank). Under
    ZeRO-3 the fake-quant parametrization reads the gathered master (its ParametrizationList
    is a submodule, so DeepSpeed's hooks gather `original` when the weight is read).
    """

    backend = "deepspeed"

    def __init__(self, model, settings: OptimSettings, total_steps: int, micro_batches_per_step: int,
                 config_path: Path, micro_batch: int):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise QatctlError("--deepspeed: the deepspeed package is not installed "
                              "(pip install 'qatctl[deepspeed]' with DS_BUILD_OPS=0)") from None
        self.rank, self.world = dist_env()
        if micro_batches_per_step % self.world:
            raise QatctlError(f"--deepspeed: {micro_batches_per_step} micro-batches per step do not split over "
                              f"{self.world} ranks (make batch_size a multiple of micro_batch x ranks)")
        gas = micro_batches_per_step // self.world
        ds_config = _deepspeed_config(config_path, micro_batch, gas, self.world, settings.max_grad_norm)
        init_distributed()
        super().__init__(model, settings, total_steps, micro_batches_per_step)
        self.rank, self.world = dist_env()  # the base class set the single-process values
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config)
        from qatctl.dscheckpoint import checkpoint_engine

        self.engine.checkpoint_engine = checkpoint_engine()  # safetensors + JSON: no pickle is ever loaded
        self.model = self.engine.module
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.cache_weights = self.zero_stage != 3
        self.scale = gas * self.world

    @property
    def forward_module(self):
        # engine(...) hooks the loss so engine.backward runs DeepSpeed's backward prologue
        # (ZeRO-3 accumulation boundary); calling the bare module skips it.
        return self.engine

    def _micro_batch(self, index: int, count: int) -> None:
        # The step's last micro-batch is the accumulation boundary, however many there are: an
        # rl-step iteration trains as many as its informative groups fill (the engine divides each
        # loss by its configured accumulation steps, which `scale` undoes).
        self.engine.set_gradient_accumulation_boundary(index + 1 == count)

    def _backward(self, loss):
        self.engine.backward(loss * self.scale)
        self.engine.step()  # DeepSpeed steps only at the accumulation boundary

    def _update(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def reduce_sum(self, x: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather_weights(self):
        if self.zero_stage == 3:  # gather every partition for good: training is over
            import deepspeed

            self._gathered = contextlib.ExitStack()
            self._gathered.enter_context(deepspeed.zero.GatheredParameters(list(self.model.parameters())))
        return self.model

    def full_weights(self):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def save_state(self, folder: Path, meta: dict) -> None:
        # Every rank writes its ZeRO partition through DeepSpeed's checkpoint code, stored as
        # safetensors + JSON by qatctl/dscheckpoint.py; rank 0 writes the RNG and state.json
        # (qatctl/state.py) after all are done.
        self.engine.save_checkpoint(str(folder), tag="ds", client_state={})
        self.barrier()
        if self.is_main:
            state.save_meta(folder, {"meta": meta})
        self.barrier()

    def load_state(self, folder: Path, require: tuple[str, ...] = ()) -> dict:
        state.load_meta(folder, restore_rng=False, require=require)  # checked before DeepSpeed reads
        self.engine.load_checkpoint(str(folder), tag="ds")
        return state.load_meta(folder)


def _deepspeed_config(path: Path, micro_batch: int, gas: int, world: int, max_grad_norm: float) -> dict:
    """The user's DeepSpeed JSON with the batch keys filled from ours; a contradiction is an error."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QatctlError(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as e:
        raise QatctlError(f"{path}: not valid JSON ({e})") from None
    ours = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
            "train_batch_size": micro_batch * gas * world, "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        if key in cfg and cfg[key] not in ("auto", value):
            raise QatctlError(f"{path}: {key}={cfg[key]!r} contradicts the command line ({value}); "
                              "set it to \"auto\" or drop it")
        cfg[key] = value
    if cfg.get("zero_optimization", {}).get("stage", 0) not in (0, 1, 2, 3):
        raise QatctlError(f"{path}: zero_optimization.stage={cfg['zero_optimization']['stage']!r} is not a "
                          "ZeRO stage (0, 1, 2 or 3)")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise QatctlError(f"{path}: remove {key!r}: qatctl passes its own AdamW and warmup/cosine schedule")
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled") and not torch.cuda.is_available():
            raise QatctlError(f"{path}: {key}.enabled needs a GPU; on CPU qatctl trains fp32 masters")
    return cfg


def make_trainer(model, settings: OptimSettings, total_steps: int, batch_size: int, micro_batch: int,
                 deepspeed_config: Path | None = None) -> Trainer:
    if batch_size % micro_batch:
        raise QatctlError(f"--batch-size {batch_size} is not a multiple of --micro-batch {micro_batch}")
    n_micro = batch_size // micro_batch
    if deepspeed_config is None:
        return Trainer(model, settings, total_steps, n_micro)
    return DeepSpeedTrainer(model, settings, total_steps, n_micro, deepspeed_config, micro_batch)
