"""Log-probabilities of completion tokens only, for single-process DPO: the fast path of `PrefqDPOTrainer`.

TRL's fused LM head scores every position of every sequence (prompt and padding included) and, on CPU, runs
its chunked online log-sum-exp in fp32 with about fifteen passes over each [positions x vocabulary] tile. Here
the LM head runs only on the positions whose next token is a completion token, with one log-softmax pass and
GEMMs in the autocast dtype (bf16 runs on this CPU's AMX units at ~5x fp32). Numbers stay TRL's: logits are
produced in the autocast dtype and soft-maxed in fp32, as TRL's CPU path does.
"""

from __future__ import annotations

import ctypes

import torch
from trl.trainer.utils import FusedCausalLMOutput


class CompletionLogProbs(torch.autograd.Function):
    """log softmax(h @ W.T)[target] for N selected positions: hidden (N, H), weight (V, H), targets (N,).

    Returns (log-probs, entropy, is-top-1, mean logit), each (N,); only the log-probs carry gradient.
    Backward: d logp / d z = onehot(target) - softmax(z), then two GEMMs in the compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        hb, wb = hidden.to(dtype), weight.to(dtype)
        logits = torch.mm(hb, wb.t())
        mean_logits = logits.float().mean(dim=-1)
        lsm = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        del logits
        logp = lsm.gather(1, targets[:, None]).squeeze(1)
        is_top1 = lsm.argmax(dim=-1) == targets
        entropy = -(lsm.exp() * lsm).sum(dim=-1)
        ctx.save_for_backward(hb, wb, targets, lsm)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(entropy, is_top1, mean_logits)
        return logp, entropy, is_top1, mean_logits

    @staticmethod
    def backward(ctx, grad, *_):
        hb, wb, targets, lsm = ctx.saved_tensors
        grad = grad.float()
        dz = lsm.exp_().mul_(-grad[:, None])  # in place on the saved buffer: it is not needed again
        dz.scatter_add_(1, targets[:, None], grad[:, None])
        dz = dz.to(hb.dtype)
        grad_h = torch.mm(dz, wb).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(dz.t(), hb).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def completion_outputs(model, inputs: dict, autocast) -> FusedCausalLMOutput:
    """Per-token outputs shaped as TRL's fused LM head gives them, (2B, T-1), zero off the completion tokens.

    `model` is the unwrapped causal LM; `autocast` the trainer's autocast context (calling the decoder
    directly bypasses the autocast that accelerate wraps around `model.forward`).
    """
    mask = inputs["completion_mask"][:, 1:].bool()
    with autocast:
        hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     use_cache=False).last_hidden_state  # fmt: skip
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        logp, entropy, is_top1, mean_logits = CompletionLogProbs.apply(
            hidden[:, :-1][mask], model.get_output_embeddings().weight, inputs["input_ids"][:, 1:][mask], dtype
        )

    def spread(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    return FusedCausalLMOutput(log_probs=spread(logp), entropy=spread(entropy), is_top1=spread(is_top1),
                               mean_logits=spread(mean_logits), label_mask=mask)  # fmt: skip


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
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                and libc.mallopt(m_top_pad, 256 << 20))  # fmt: skip
