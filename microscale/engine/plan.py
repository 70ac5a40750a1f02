"""Will it fit: one rank's memory from config.json and the engine's options alone, before any weight is read.

Weights are counted exactly by building the rank's model on the meta device (no memory, no checkpoint): the
layers and quant methods create the very parameters and buffers they will load, so the count follows every
format (FP8 with its scales, MXFP4 blocks with their E8M0 scales, what a format leaves unquantized) and the
tensor-parallel sharding without a table of our own. KV bytes per token come from the KV cache format's own
`bytes_per_token`; the KV budget follows the engine's rules (engine/shard.py). Activations, CUDA graphs and
the non-torch memory of a GPU are estimates (see `activation_bytes`); on a GPU the engine still measures a
profiled step before sizing the cache, so the plan decides only whether to refuse a start."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from microscale.config import EngineArgs, ModelConfig
from microscale.distributed.parallel_state import planned_layout
from microscale.engine.cuda_graphs import bucket_sizes
from microscale.engine.device_peaks import datasheet_for
from microscale.engine.spec_decode.draft_config import draft_model_config
from microscale.layers.attention import Attention
from microscale.models.registry import get_model_class
from microscale.quant.kv_cache import make_kv_cache
from microscale.quant.scheme import QuantScheme

_GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 4.0
# A GPU process's memory outside torch's allocator: CUDA context, cuBLAS and NCCL workspaces (an estimate;
# the engine measures it after its profiled step).
GPU_NON_TORCH_BYTES = _GIB * 3 // 4
# Each captured decode graph's own bookkeeping beyond the shared pool (an estimate).
GRAPH_OVERHEAD_BYTES = 2 << 20
COMPONENTS = ("embeddings", "attention", "mlp", "experts", "norms", "lm_head", "rope tables", "draft model")


@dataclass(frozen=True)
class DeviceMemory:
    """What the plan sizes for: a device kind ("cpu" or "cuda"), its name, total and free bytes."""

    kind: str
    name: str
    total: int
    free: int

    @classmethod
    def of(cls, device: torch.device) -> DeviceMemory:
        """The device this process runs on, now (GPU: free memory as the driver reports it; CPU: host RAM)."""
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return cls("cuda", torch.cuda.get_device_name(device), total, free)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls("cpu", "cpu", total, _host_available(total))

    @classmethod
    def named(cls, device: str | None, gpu_memory_gib: float | None) -> DeviceMemory:
        """For `microscale plan`: "cpu", "cuda" (this machine's GPU, or one of --gpu-memory GiB) or a GPU of the
        datasheet table by name ("H100"), its memory all free."""
        if gpu_memory_gib is not None and gpu_memory_gib <= 0:
            raise ValueError(f"--gpu-memory must be positive GiB, got {gpu_memory_gib}.")
        if device in (None, "cpu") and gpu_memory_gib is None:
            return cls.of(torch.device("cpu"))
        found = datasheet_for(device) if device not in (None, "cpu", "cuda") else None
        if device not in (None, "cpu", "cuda") and found is None:
            raise ValueError(f"Unknown device {device!r}: cpu, cuda, or a GPU of {', '.join(_known_gpus())}.")
        if gpu_memory_gib is not None:
            size = int(gpu_memory_gib * _GIB)
            return cls("cpu" if device == "cpu" else "cuda", found[0] if found else (device or "cuda"), size, size)
        if found is not None:
            size = int(found[1].memory_gib * _GIB)
            return cls("cuda", found[0], size, size)
        if not torch.cuda.is_available():
            raise ValueError("No GPU here: give its memory (--gpu-memory GiB) or its name (--device H100).")
        return cls.of(torch.device("cuda"))


def _known_gpus() -> list[str]:
    from microscale.engine.device_peaks import DATASHEETS

    return list(DATASHEETS)


def _host_available(total: int) -> int:
    """MemAvailable (free plus reclaimable cache) where /proc/meminfo says it, else the total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def build_meta_model(cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme, max_position: int, tp: int,
                     expert_parallel: bool) -> nn.Module:
    """Rank 0's model with every parameter and buffer on the meta device: shapes and dtypes, no memory."""
    with planned_layout(tp, expert_parallel), torch.device("meta"):
        return get_model_class(cfg.architecture)(cfg, dtype, max_position, quant)


def component_of(name: str) -> str:
    """Which part of the model a parameter or buffer name belongs to (COMPONENTS)."""
    leaf_module = name.rsplit(".", 1)[0]
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "rotary" in name:
        return "rope tables"
    if leaf_module.endswith("norm"):
        return "norms"
    if ".mlp.experts." in name:
        return "experts"
    return "attention" if ".self_attn." in name else "mlp"


def precision_of(name: str, tensor: torch.Tensor) -> str:
    """How a tensor stores its values: the dtype, with the MXFP4 and FP8 parts named."""
    if tensor.dtype == torch.uint8 and name.endswith("_blocks"):
        return "mxfp4 blocks"
    if tensor.dtype == torch.uint8 and name.endswith("_scales"):
        return "e8m0 scales"
    if tensor.dtype == torch.float8_e4m3fn:
        return "fp8"
    if tensor.dtype == torch.float32 and "scale" in name.rsplit(".", 1)[-1]:
        return "fp32 scales"
    return str(tensor.dtype).removeprefix("torch.")


def tensor_bytes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Bytes of every parameter and buffer (each once, tied ones too), by component and precision."""
    out: dict[str, dict[str, int]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        by_precision = out.setdefault(component_of(name), {})
        precision = precision_of(name, tensor)
        by_precision[precision] = by_precision.get(precision, 0) + tensor.numel() * tensor.element_size()
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers (each once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int, rows: int, tp: int) -> int:
    """An estimate of one step's peak activations on a rank: `tokens` tokens through a layer (the residual,
    the normed input, q/k/v, the attention output, the MLP's gate/up and activation, or for MoE the k routed
    copies of them), and float32 logits plus probabilities of the `rows` sampled rows over the vocabulary."""
    heads = cfg.num_attention_heads // tp
    kv_heads = max(1, cfg.num_key_value_heads // tp)
    q, kv = heads * cfg.head_dim, kv_heads * cfg.head_dim
    inter = cfg.intermediate_size // tp
    mlp = 3 * inter * (cfg.num_experts_per_tok if cfg.num_experts else 1) + cfg.num_experts
    per_token = 4 * cfg.hidden_size + q + 2 * kv + q + mlp
    return tokens * per_token * dtype.itemsize + 2 * rows * cfg.vocab_size * 4


def blocks_per_seq(max_model_len: int, block_size: int) -> int:
    """KV blocks one sequence of max_model_len tokens takes."""
    return -(-max_model_len // block_size)


def fixed_kv_budget(args: EngineArgs, device_kind: str, max_model_len: int, block_bytes: int) -> int | None:
    """KV cache bytes where no GPU profile decides them: kv_cache_memory when given, else on a CPU no more than
    every sequence slot could ever use, at most DEFAULT_CPU_KV_GIB. None: a GPU's measured budget."""
    if args.kv_cache_memory is not None:
        return int(args.kv_cache_memory * _GIB)
    if device_kind != "cuda":
        return int(min(DEFAULT_CPU_KV_GIB * _GIB,
                       args.max_num_seqs * blocks_per_seq(max_model_len, args.block_size) * block_bytes))
    return None


@dataclass
class MemoryPlan:
    model: str
    device: str
    device_kind: str
    device_total: int
    device_free: int
    tp: int
    dtype: str
    quant_linear: str
    quant_experts: str
    kv_cache_quant: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    weights: dict[str, dict[str, int]]  # component -> precision -> bytes (one rank)
    activations: int
    cuda_graphs: int
    non_torch: int
    kv_bytes_per_token: int
    kv_budget: int
    kv_budget_rule: str
    num_blocks: int
    fits: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(sum(parts.values()) for parts in self.weights.values())

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def full_sequences(self) -> int:
        """Sequences of max_model_len tokens the KV cache holds at once."""
        return self.num_blocks // blocks_per_seq(self.max_model_len, self.block_size)

    @property
    def largest_max_model_len(self) -> int:
        """The longest sequence the KV cache holds (0: none)."""
        return self.kv_tokens

    @property
    def largest_max_num_seqs(self) -> int:
        """Full sequences the KV cache holds at once at max_model_len, or at the largest that fits if shorter."""
        length = min(self.max_model_len, self.largest_max_model_len)
        return self.num_blocks // blocks_per_seq(length, self.block_size) if length else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, kv_tokens=self.kv_tokens, full_sequences=self.full_sequences,
                 largest_max_model_len=self.largest_max_model_len, largest_max_num_seqs=self.largest_max_num_seqs,
                 verdict=self.verdict())
        return d

    def verdict(self) -> str:
        if not self.fits:
            return "does not fit: " + "; ".join(self.problems)
        return (f"fits: {self.kv_tokens} KV tokens, {self.full_sequences} sequences of {self.max_model_len} "
                f"tokens at once (max_num_seqs {self.max_num_seqs})")

    def summary(self) -> str:
        """One log line."""
        return (f"plan ({self.device}, tp {self.tp}): weights {_gib(self.weight_bytes)} per rank, activations "
                f"~{_gib(self.activations)}, CUDA graphs ~{_gib(self.cuda_graphs)}, KV {self.kv_bytes_per_token} "
                f"B/token, budget {_gib(self.kv_budget)} -> {self.verdict()}")

    def refusal(self) -> str:
        """Why the engine will not start this configuration, and the largest limits that would fit."""
        if self.num_blocks > 0:
            length = min(self.max_model_len, self.largest_max_model_len)
            fix = (f"the largest that fit are max_model_len={length} with max_num_seqs={self.largest_max_num_seqs} "
                   f"full sequences at once")
        else:
            fix = "no max_model_len fits: use more tensor-parallel ranks (--tp), --quant, or a larger device"
        return f"This configuration cannot fit ({self.summary()}): {fix}."

    def render(self) -> str:
        """The plan as a table for the terminal."""
        lines = [f"{self.model} on {self.device} ({_gib(self.device_total)} total, {_gib(self.device_free)} free), "
                 f"tp {self.tp}, {self.dtype}, quant {self.quant_linear} (experts {self.quant_experts}), "
                 f"KV {self.kv_cache_quant}", "", f"{'weights per rank':<28}{'bytes':>16}{'GiB':>10}"]
        for component in COMPONENTS:
            for precision, size in sorted(self.weights.get(component, {}).items()):
                lines.append(f"  {component + ' (' + precision + ')':<26}{size:>16,}{size / _GIB:>10.3f}")
        lines.append(f"  {'total':<26}{self.weight_bytes:>16,}{self.weight_bytes / _GIB:>10.3f}")
        lines += [
            f"{'activations (estimate)':<28}{self.activations:>16,}{self.activations / _GIB:>10.3f}",
            f"{'CUDA graphs (estimate)':<28}{self.cuda_graphs:>16,}{self.cuda_graphs / _GIB:>10.3f}",
            f"{'non-torch (estimate)':<28}{self.non_torch:>16,}{self.non_torch / _GIB:>10.3f}",
            f"{'KV cache budget':<28}{self.kv_budget:>16,}{self.kv_budget / _GIB:>10.3f}  ({self.kv_budget_rule})",
            f"KV bytes per token {self.kv_bytes_per_token:,} -> {self.num_blocks} blocks of {self.block_size} = "
            f"{self.kv_tokens:,} tokens; {self.full_sequences} full sequences of {self.max_model_len} "
            f"(max_num_seqs {self.max_num_seqs}, {self.max_num_batched_tokens} tokens per step)",
            *[f"note: {note}" for note in self.notes],
            f"verdict: {self.verdict()}",
        ]
        if not self.fits:
            lines.append(self.refusal())
        return "\n".join(lines)


def _kv_bytes_per_token(model: nn.Module, kv_cache_quant: str | None, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes over every attention layer of `model`, in the format `kv_cache_quant`."""
    return sum(make_kv_cache(kv_cache_quant, layer.num_kv_heads, layer.head_dim, dtype,
                             torch.device("meta")).bytes_per_token()
               for layer in model.modules() if isinstance(layer, Attention))


def _draft_meta_model(args: EngineArgs, target: ModelConfig, dtype: torch.dtype, max_model_len: int
                      ) -> nn.Module | None:
    """Speculative decoding's draft model (method "draft") on the meta device: unquantised, in the target's dtype,
    unsharded (its config.json is all that is read)."""
    spec = args.speculative_config
    if spec is None or spec.method != "draft":
        return None
    _, cfg = draft_model_config(spec, target, max_model_len)
    return build_meta_model(cfg, dtype, QuantScheme.resolve(None, None), max_model_len, 1, False)


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


@dataclass(frozen=True)
class GpuMemory:
    """What sizes the KV cache on a GPU, in bytes, accounted as vLLM's memory profiling does."""

    total: int
    free_at_start: int  # before the shard loaded
    free: int  # after the profiled step, torch's cached blocks handed back
    weights: int  # torch memory the shard held before the profiled step (weights, buffers)
    peak_activation: int  # the profiled step's peak torch memory above that
    non_torch: int  # memory this process took outside torch since the start (NCCL, cuBLAS workspaces)


def kv_cache_budget(mem: GpuMemory, cache_max_entry_count: float, gpu_memory_utilization: float | None) -> int:
    """Bytes the KV cache may take on a GPU.

    gpu_memory_utilization (vLLM's meaning; wins when set): the engine may use this fraction of the GPU's total
    memory in all, so the KV cache gets it less the weights, the peak activations and this process's non-torch
    memory. Other processes' memory is not charged to it, but (as in vLLM) they must leave that much free at the
    start. cache_max_entry_count (LMDeploy's meaning): this fraction of the memory left free after the weights
    and the peak activations.
    """
    if gpu_memory_utilization is None:
        budget = cache_max_entry_count * (mem.free - mem.peak_activation)
    else:
        requested = gpu_memory_utilization * mem.total
        if mem.free_at_start < requested:
            raise ValueError(
                f"gpu_memory_utilization={gpu_memory_utilization} asks for {requested / _GIB:.2f} GiB of the GPU's "
                f"{mem.total / _GIB:.2f} GiB, but only {mem.free_at_start / _GIB:.2f} GiB were free when the engine "
                f"started (other processes hold the rest): lower it, or free the GPU."
            )
        budget = requested - mem.weights - mem.peak_activation - mem.non_torch
    return max(0, int(budget))


def plan_memory(args: EngineArgs, cfg: ModelConfig, max_model_len: int, dtype: torch.dtype, mem: DeviceMemory,
                model_name: str | None = None) -> MemoryPlan:
    """The plan of one rank for `args` on `mem`; reads nothing but `cfg`."""
    quant = QuantScheme.resolve(args.quantization, cfg.hf_config.get("quantization_config"))
    kv_cache_quant = args.kv_cache_quant or quant.checkpoint_kv_cache
    tp = args.tensor_parallel_size
    model = build_meta_model(cfg, dtype, quant, max_model_len, tp, args.enable_expert_parallel)
    weights = tensor_bytes(model)
    kv_per_token = _kv_bytes_per_token(model, kv_cache_quant, dtype)
    draft = _draft_meta_model(args, cfg, dtype, max_model_len)
    if draft is not None:  # its weights, and its cache beside the target's (as many blocks: engine/shard.py)
        weights["draft model"] = {}
        for parts in tensor_bytes(draft).values():
            for precision, size in parts.items():
                weights["draft model"][precision] = weights["draft model"].get(precision, 0) + size
        kv_per_token += _kv_bytes_per_token(draft, None, dtype)
    block_bytes = kv_per_token * args.block_size
    gpu = mem.kind == "cuda"
    activations = activation_bytes(cfg, dtype, args.max_num_batched_tokens,
                                   min(args.max_num_seqs, args.max_num_batched_tokens), tp)
    graphs = 0
    if gpu and not args.enforce_eager and tp == 1:
        # The captured graphs share one memory pool, which the largest bucket's intermediates size.
        graphs = (activation_bytes(cfg, dtype, args.max_num_seqs, args.max_num_seqs, tp)
                  + len(bucket_sizes(args.max_num_seqs)) * GRAPH_OVERHEAD_BYTES)
    non_torch = GPU_NON_TORCH_BYTES if gpu else 0
    weight_total = sum(sum(parts.values()) for parts in weights.values())
    problems: list[str] = []
    notes: list[str] = []
    budget = fixed_kv_budget(args, mem.kind, max_model_len, block_bytes)
    if budget is not None:
        rule = (f"kv_cache_memory={args.kv_cache_memory} GiB" if args.kv_cache_memory is not None else
                f"CPU: what max_num_seqs full sequences take, at most {DEFAULT_CPU_KV_GIB:g} GiB")
    else:
        predicted = GpuMemory(total=mem.total, free_at_start=mem.free,
                              free=mem.free - weight_total - non_torch, weights=weight_total,
                              peak_activation=activations, non_torch=non_torch)
        try:
            budget = kv_cache_budget(predicted, args.cache_max_entry_count, args.gpu_memory_utilization)
        except ValueError as e:
            problems.append(str(e))
            budget = 0
        rule = (f"gpu_memory_utilization={args.gpu_memory_utilization}" if args.gpu_memory_utilization is not None
                else f"cache_max_entry_count={args.cache_max_entry_count}")
    # CPU ranks share the host's memory; each GPU rank has its own device.
    ranks_here = 1 if gpu else tp
    needed = ranks_here * (weight_total + activations + non_torch + min(budget, block_bytes * blocks_per_seq(
        max_model_len, args.block_size)))
    if needed > mem.free:
        problems.append(f"weights, activations and one sequence's KV cache need {_gib(needed)}, {_gib(mem.free)} "
                        f"{'free' if gpu else 'available'} on {mem.name}")
        if weight_total * ranks_here + activations > mem.free:
            budget = 0
    num_blocks = int(budget // block_bytes) if block_bytes else 0
    if num_blocks < blocks_per_seq(max_model_len, args.block_size) and not problems:
        problems.append(f"the KV cache budget ({_gib(budget)} = {num_blocks} blocks of {args.block_size} tokens) "
                        f"cannot hold one sequence of max_model_len={max_model_len} tokens")
    left = mem.free - weight_total - non_torch - budget
    if graphs and left < graphs:
        notes.append(f"the CUDA graphs (~{_gib(graphs)}) may not fit in the {_gib(max(0, left))} the KV cache leaves: "
                     "lower cache_max_entry_count or use --enforce-eager")
    if kv_cache_quant == "int8":
        notes.append("int8 KV counted with per-token scales: calibrated static scales would leave room for more")
    return MemoryPlan(
        model=model_name or cfg.architecture, device=mem.name, device_kind=mem.kind, device_total=mem.total,
        device_free=mem.free, tp=tp, dtype=str(dtype).removeprefix("torch."), quant_linear=quant.linear,
        quant_experts=quant.experts, kv_cache_quant=kv_cache_quant or "none", max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, weights=weights, activations=activations, cuda_graphs=graphs,
        non_torch=non_torch, kv_bytes_per_token=kv_per_token, kv_budget=budget, kv_budget_rule=rule,
        num_blocks=num_blocks, fits=not problems, problems=problems, notes=notes,
    )
