"""Log-probabilities of completion tokens only, for single-process DPO: the fast path of `PrefqDPOTrainer`.

TRL's fused LM head scores every position of every sequence (prompt and padding included) and, on CPU, runs
its chunked online log-sum-exp in fp32 with about fifteen passes over each [positions x vocabulary] tile. Here
the LM head runs only on the positions whose next token is a completion token, with one log-softmax pass per
tile and GEMMs in the autocast dtype (bf16 runs on AVX512-BF16 or AMX units at 2.5-5x fp32). Numbers stay TRL's:
logits are produced in the autocast dtype and soft-maxed in fp32, as TRL's CPU path does. With `packed`, the
decoder runs on the batch's real tokens only (`training.packing`).
"""

from __future__ import annotations

import ctypes

import torch
from trl.trainer.utils import FusedCausalLMOutput

from training.memory import LM_HEAD_KEEP_BYTES, LM_HEAD_TILE_BYTES
from training.packing import pack


class CompletionLogProbs(torch.autograd.Function):
    """log softmax(h @ W.T)[target] for N selected positions: hidden (N, H), weight (V, H), targets (N,).

    Returns (log-probs, entropy, is-top-1, mean logit), each (N,); only the log-probs carry gradient.
    Backward: d logp / d z = onehot(target) - softmax(z), then two GEMMs in the compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        hb, wb = hidden.to(dtype), weight.to(dtype)
        n, vocab = hb.size(0), wb.size(0)
        rows = max(1, LM_HEAD_TILE_BYTES // (4 * vocab))
        keep = n * vocab * 4 <= LM_HEAD_KEEP_BYTES
        logp, entropy, lse, mean_logits = (hb.new_empty(n, dtype=torch.float32) for _ in range(4))
        is_top1 = torch.empty(n, dtype=torch.bool, device=hb.device)
        ctx.kept = []
        for start in range(0, n, rows):
            tile = slice(start, start + rows)
            logits = torch.mm(hb[tile], wb.t())
            lsm = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            target = targets[tile, None]
            logp[tile] = lsm.gather(1, target).squeeze(1)
            lse[tile] = logits.gather(1, target).squeeze(1).float() - logp[tile]  # logits = log-softmax + lse
            del logits
            mean_logits[tile] = lsm.mean(dim=-1) + lse[tile]
            is_top1[tile] = lsm.argmax(dim=-1) == targets[tile]
            entropy[tile] = -lsm.exp().mul_(lsm).sum(dim=-1)
            if keep:
                ctx.kept.append(lsm)
        ctx.save_for_backward(hb, wb, targets, lse)
        ctx.rows, ctx.dtypes = rows, (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(entropy, is_top1, mean_logits)
        return logp, entropy, is_top1, mean_logits

    @staticmethod
    def backward(ctx, grad, *_):
        hb, wb, targets, lse = ctx.saved_tensors
        grad = grad.float()
        grad_h = torch.empty_like(hb) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(wb.shape, dtype=torch.float32, device=wb.device) if ctx.needs_input_grad[1] else None
        kept, ctx.kept = ctx.kept, None
        for i, start in enumerate(range(0, hb.size(0), ctx.rows)):
            tile = slice(start, start + ctx.rows)
            # softmax in place of the kept log-softmax or of the recomputed logits: neither is needed again
            probs = kept[i].exp_() if kept else torch.mm(hb[tile], wb.t()).sub(lse[tile, None]).exp_()
            dz = probs.mul_(-grad[tile, None])
            dz.scatter_add_(1, targets[tile, None], grad[tile, None])
            dz = dz.to(hb.dtype)
            if kept:
                kept[i] = None
            if grad_h is not None:
                grad_h[tile] = torch.mm(dz, wb)
            if grad_w is not None:
                grad_w += torch.mm(dz.t(), hb[tile])
        grad_h = grad_h.to(ctx.dtypes[0]) if grad_h is not None else None
        grad_w = grad_w.to(ctx.dtypes[1]) if grad_w is not None else None
        return grad_h, grad_w, None, None


def completion_outputs(model, inputs: dict, autocast, packed: bool) -> FusedCausalLMOutput:
    """Per-token outputs shaped as TRL's fused LM head gives them, (2B, T-1), zero off the completion tokens.

    `model` is the unwrapped causal LM; `autocast` the trainer's autocast context (calling the decoder
    directly bypasses the autocast that accelerate wraps around `model.forward`); `packed`: run the decoder on the
    real tokens only, in one row (the model must use `training.packing.VARLEN` attention).
    """
    mask = inputs["completion_mask"][:, 1:].bool()
    with autocast:
        if packed:
            row = pack(inputs["input_ids"], inputs["attention_mask"])
            hidden = model.get_decoder()(**row.model_kwargs(), use_cache=False).last_hidden_state[0]
            hidden = hidden[row.offsets[mask]]
        else:
            hidden = model.get_decoder()(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1][mask]
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        logp, entropy, is_top1, mean_logits = CompletionLogProbs.apply(
            hidden, model.get_output_embeddings().weight, inputs["input_ids"][:, 1:][mask], dtype
        )

    def spread(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    return FusedCausalLMOutput(
        log_probs=spread(logp),
        entropy=spread(entropy),
        is_top1=spread(is_top1),
        mean_logits=spread(mean_logits),
        label_mask=mask,
    )


def keep_freed_memory() -> bool:
    """glibc: keep freed large blocks in the heap instead of unmapping them.

    PyTorch's CPU allocator calls malloc and free directly, and glibc serves blocks above 32 MiB with fresh
    mmap()s, so each step's large temporaries are page-faulted in again (measured: elementwise ops on 144 MB
    tensors 3-5x slower). Same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^31-1 MALLOC_TOP_PAD_=256MiB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(
        libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_top_pad, 256 << 20)
    )
