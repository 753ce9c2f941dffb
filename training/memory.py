"""How much memory a training run needs on each device, from the model's `config.json` and the spec: torch-free.

The API checks a job against the live workers' inventory before it queues it (`api.service.checks.fits`), the run
checks again against the memory it finds free before it loads the model (`training.run`), and a run that runs out
of memory anyway ends with the same advice (`advice`). One estimate serves all three.

Per device, in bytes:
- weights: fp32 master weights (prefq loads in fp32 and trains under bf16 autocast); with QLoRA the frozen linear
  layers in NF4 (half a byte a weight plus the double-quantised absmax) and the rest in fp32;
- gradients and AdamW state: 4 + 8 bytes for each trained weight (all of them, or the adapters);
- reference: the frozen copy that DPO and KTO compare with (none with LoRA: the adapter is switched off); the
  single-process path keeps its linear layers in bf16;
- activations: what autograd keeps per token and layer (below), for `batch_size` sequences of `max_length` tokens
  (twice as many for pairs), or with gradient checkpointing each layer's input and one layer's worth;
- head: the LM head's logits: prefq's completion head on the single-process pair path, else TRL's head (SFT, KTO,
  LoRA, `fsdp`, `deepspeed-tp`) with about ten fp32 copies of the logits;
- runtime: what a process holds beyond these (below).
`fsdp` and `deepspeed-tp` divide weights, gradients, optimizer state and reference among the devices; on CPU each
process loads a whole copy before sharding, which is that process's peak while loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.spec import TrainingSpec

# prefq's completion head (`training.logprobs`) runs on tiles of positions whose fp32 (positions x vocabulary)
# log-softmax takes LM_HEAD_TILE_BYTES. The backward reuses the forward's log-softmax when all of it fits in
# LM_HEAD_KEEP_BYTES (a step's completion tokens at a small vocabulary: no recompute); above that (152k vocabulary x
# 8k tokens would be 5 GB) it recomputes each tile's logits: one more GEMM of the head, and a peak of a few tiles
# whatever the vocabulary and token count.
LM_HEAD_TILE_BYTES = 128 << 20
LM_HEAD_KEEP_BYTES = 1 << 30
# Bytes autograd keeps per token and layer under bf16 autocast with an fp32 residual stream, per unit of the hidden
# size and of the MLP's width: the norms' fp32 inputs and outputs, bf16 copies of every linear layer's input, q, k,
# v and the attention output, the MLP's gate, up, activation and product. Fitted to the CPU models' measured peaks
# (tests/test_memory.py: gradient checkpointing on and off). fp32 measured on a CPU without native bf16 (where
# `precision: auto` is fp32): about 1.2 times bf16, as autocast already keeps the norms and the residual in fp32.
ACT_PER_HIDDEN = {"bf16": 56, "fp32": 68}
ACT_PER_MLP = {"bf16": 10, "fp32": 12}
# TRL's head (SFT, and DPO with LoRA or several processes) holds about ten fp32 copies of a token's logits at once
# (logits, log-softmax, entropy and accuracy terms, their gradients), over vocabulary chunks of at most this many.
TRL_HEAD_COPIES = 10
TRL_VOCAB_CHUNK = 32768
# prefq's completion head keeps the log-softmax of a step's completion tokens and, in passing, the logits.
FAST_HEAD_COPIES = 2
# What a training process holds beyond the estimate's parts: on CPU, the libraries, the tokenizer and the data
# loaded after the model (measured: 0.13-0.15 GiB on the micro model, where the parts are nearly nothing); on CUDA,
# the context and the libraries' workspaces, outside the allocator's count.
RUNTIME = {"cpu": 150 << 20, "cuda": 768 << 20}
TWO_SEQUENCES = {"dpo", "orpo", "simpo", "reward", "kto"}  # chosen and rejected (KTO: its KL batch) in one step
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder: read from config.json by `shape`."""

    hidden: int
    layers: int
    mlp: int  # the MLP's width per token (the experts a token visits, for a mixture of experts)
    vocab: int
    params: int  # every weight
    linear: int  # weights of the decoder's linear layers (what LoRA adapts and QLoRA quantises)
    lora_width: int  # sum of (in + out) over one layer's linear layers, for the adapters' size


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def shape(config: dict) -> Shape:
    """The decoder's shape and parameter count from its config.json (Llama-like families and GPT-2)."""
    c = _text_config(config)
    if c.get("model_type") == "gpt2" or "n_embd" in c:
        h, n, v = c["n_embd"], c["n_layer"], c["vocab_size"]
        mlp = c.get("n_inner") or 4 * h
        per_layer_linear = 3 * h * h + h * h + 2 * h * mlp
        linear = n * per_layer_linear
        params = linear + v * h + c.get("n_positions", 1024) * h + n * (4 * h + 3 * h + h + mlp + h) + 2 * h
        return Shape(h, n, mlp, v, params, linear, 2 * (4 * h + mlp))
    h, n, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    q, kvd = heads * hd, kv * hd
    attn = h * q + 2 * h * kvd + q * h
    attn_width = (h + q) + 2 * (h + kvd) + (q + h)
    experts = c.get("num_experts") or c.get("num_local_experts") or 0
    if experts:
        inter = c.get("moe_intermediate_size") or c["intermediate_size"]
        shared = c.get("shared_expert_intermediate_size") or 0
        mlp_params = experts * 3 * h * inter + h * experts + 3 * h * shared
        mlp = (c.get("num_experts_per_tok") or 2) * inter + shared
        mlp_width = experts * 3 * (h + inter)
    else:
        inter = c["intermediate_size"]
        mlp_params, mlp, mlp_width = 3 * h * inter, inter, 3 * (h + inter)
    biases = (q + 2 * kvd) if c.get("attention_bias") or c.get("model_type") == "qwen2" else 0
    norms = 2 * h + (2 * hd if c.get("model_type") in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3") else 0)
    if c.get("model_type") in ("gemma2", "gemma3_text", "gemma3"):
        norms += 2 * h  # pre- and post-feedforward norms
    if c.get("model_type") == "olmo2":
        norms += q + kvd  # q and k norms over the whole projection
    tied = bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
    linear = n * (attn + mlp_params)
    params = linear + n * (biases + norms) + v * h * (1 if tied else 2) + h
    return Shape(h, n, mlp, v, params, linear, attn_width + mlp_width)


@dataclass
class Estimate:
    """Peak bytes per device, by part; `total` is what a device must hold."""

    params: int
    trained: int
    devices: int
    parts: dict[str, int] = field(default_factory=dict)
    load_peak: int = 0  # CPU processes: a whole copy loaded before sharding

    @property
    def total(self) -> int:
        return max(sum(self.parts.values()), self.load_peak)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        return (
            f"{self.params / 1e6:.0f}M parameters ({self.trained / 1e6:.1f}M trained) need about "
            f"{self.total / GIB:.2f} GiB per device ({parts} GiB)"
        )


def _lora_params(s: Shape, r: int, targets) -> int:
    width = s.lora_width if targets == "all-linear" else s.lora_width * min(1.0, len(targets) / 7)
    return int(s.layers * r * width)


def _precision(spec: TrainingSpec, cpu: bool) -> str:
    """The precision the run will use: `auto` is bf16 on CUDA; on a CPU, whose bf16 support the API cannot see,
    fp32, the larger."""
    if spec.precision == "auto":
        return "fp32" if cpu else "bf16"
    return spec.precision


def estimate(config: dict, spec: TrainingSpec, cpu: bool = False) -> Estimate:
    """Peak memory per device of `spec` on the model of `config`; `cpu`: the devices are processes on one host."""
    s = shape(config)
    devices = max(1, spec.gpus) if spec.trainer != "basic" else 1
    lora = spec.lora
    quantized = lora is not None and lora.quantize == "4bit"
    trained = _lora_params(s, lora.r, lora.target_modules) if lora else s.params
    other = s.params - s.linear
    if quantized:
        weights = int(s.linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + 4 * other + 4 * trained
    else:
        weights = 4 * s.params + (4 * trained if lora else 0)
    reference = 0
    if spec.has_reference and lora is None:
        bf16_linear = spec.trainer == "basic" and _precision(spec, cpu) == "bf16"  # `training.dpo` casts them
        reference = 2 * s.linear + 4 * other if bf16_linear else 4 * s.params
    sequences = spec.batch_size * (2 if spec.method in TWO_SEQUENCES else 1)
    tokens = sequences * spec.max_length
    precision = _precision(spec, cpu)
    per_token_layer = ACT_PER_HIDDEN[precision] * s.hidden + ACT_PER_MLP[precision] * s.mlp
    if spec.gradient_checkpointing:
        activations = tokens * (s.layers * 4 * s.hidden + per_token_layer)
    else:
        activations = tokens * s.layers * per_token_layer
    logits = tokens * s.vocab * 4
    fast = spec.pairs and spec.trainer == "basic" and lora is None
    if spec.method == "reward":
        head = 0  # one score per sequence
    elif fast:  # `training.dpo`'s single-process path: prefq's completion head (`training.logprobs`)
        head = FAST_HEAD_COPIES * logits if logits <= LM_HEAD_KEEP_BYTES else 4 * LM_HEAD_TILE_BYTES
    else:
        head = TRL_HEAD_COPIES * tokens * min(s.vocab, TRL_VOCAB_CHUNK) * 4
    parts = {
        "weights": weights // devices,
        "gradients": 4 * trained // devices,
        "optimizer": 8 * trained // devices,
        "reference": reference // devices,
        "activations": activations,
        "head": head,
        "runtime": RUNTIME["cpu" if cpu else "cuda"],
    }
    load_peak = (weights + reference) if (cpu and devices > 1) else 0
    return Estimate(s.params, trained, devices, parts, load_peak)


def knobs(config: dict, spec: TrainingSpec, budget: int, cpu: bool = False, max_devices: int = 1) -> list[str]:
    """Changes of the spec that bring its estimate under `budget` bytes per device, each with its estimate: the
    single changes that fit, else the shortest run of them, taken in order, that does."""
    tries: list[tuple[str, dict]] = []
    if not spec.gradient_checkpointing:
        tries.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if spec.lora is None:
        tries.append(("lora: {} (LoRA adapters; no reference copy)", {"lora": {}}))
    if spec.lora is None or spec.lora.quantize is None:
        lora = spec.lora.model_dump() if spec.lora is not None else {}
        tries.append(('lora: {"quantize": "4bit"} (QLoRA)', {"lora": {**lora, "quantize": "4bit"}}))
    if spec.batch_size > 1:
        b = max(1, spec.batch_size // 4)
        steps = spec.gradient_accumulation_steps * spec.batch_size // b
        tries.append(
            (
                f"batch_size: {b} with gradient_accumulation_steps: {steps}",
                {"batch_size": b, "gradient_accumulation_steps": steps},
            )
        )
    if spec.max_length > 512:
        tries.append(("max_length: 512", {"max_length": 512}))
    if max_devices > 1 and spec.gpus < max_devices and not (spec.lora and spec.lora.quantize):
        tries.append((f"trainer: fsdp with gpus: {max_devices}", {"trainer": "fsdp", "gpus": max_devices}))

    def need(change: dict) -> int | None:
        try:
            return estimate(config, TrainingSpec.model_validate({**spec.model_dump(), **change}), cpu).total
        except ValueError:  # a combination the spec refuses (QLoRA with fsdp)
            return None

    singles = [(text, n) for text, change in tries if (n := need(change)) is not None and n <= budget]
    if singles:
        return [f"{text}: about {n / GIB:.2f} GiB" for text, n in singles]
    texts: dict[str, str] = {}  # the change's key -> its text (QLoRA's `lora` replaces LoRA's)
    change: dict = {}
    for text, more in tries:
        if need({**change, **more}) is None:
            continue
        texts = {k: v for k, v in texts.items() if k not in more} | {next(iter(more)): text}
        change.update(more)
        if (n := need(change)) is not None and n <= budget:
            return [f"{' and '.join(texts.values())} together: about {n / GIB:.2f} GiB"]
    return []


def advice(config: dict, spec: TrainingSpec, budget: int, cpu: bool = False, max_devices: int = 1) -> str:
    """One sentence: what the job needs, what there is, and what would make it fit."""
    need = estimate(config, spec, cpu)
    ways = knobs(config, spec, budget, cpu, max_devices)
    fix = "; ".join(ways) if ways else "none of these changes, even together; use a smaller model or more devices"
    return f"{need.describe()}; {budget / GIB:.2f} GiB per device is available. Would fit: {fix}"
