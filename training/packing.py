"""Padding-free DPO batches: the sequences of a padded batch packed end to end into one row.

TRL's collator pads every batch to its longest sequence. On long-tailed data (HH-RLHF-like lengths) most of a
batch is then padding, and the model computes on it. `pack` keeps the real tokens of the 2B right-padded
sequences in one row, with position ids that restart at 0 for each sequence (so RoPE sees what it sees in the
padded batch) and the sequence boundaries (`cu_seq_lens`, as in flash-attention's varlen API). The model runs on
that row; `Packed.spread` puts per-token outputs back into the padded (2B, T-1) layout that TRL's loss and
metrics read, so losses and logs stay TRL's.

Attention must not cross sequences: `VARLEN` is an attention implementation registered with transformers that
reads the boundaries. On CUDA in bf16/fp16 it runs PyTorch's flash varlen kernel; elsewhere one causal sdpa call
per sequence. Measured on this CPU (23M-parameter Llama, 16 sequences, 55% padding, decoder forward+backward): the
padded batch 5.9 s, packed with one sdpa call per sequence 2.8 s, packed with one sdpa call and a block-diagonal
mask (transformers' default for packed position ids) 7.9 s. Without boundaries (a padded batch) it is plain sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "prefq_varlen"


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    """Causal attention within each packed sequence. query (1, heads, N, d), key and value (1, kv_heads, N, d);
    returns (1, N, heads, d) and no weights, as transformers' sdpa does."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.size(1) != key.size(1)
    # RoPE's fp32 cos/sin promote q and k to fp32 under autocast; sdpa casts them back itself, the varlen kernel not
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if query.is_cuda and dtype in (torch.bfloat16, torch.float16) and dropout == 0:
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))  # (N, heads, d)
        out = varlen_attn(
            q,
            k,
            v,
            cu_seq_lens_q,
            cu_seq_lens_q,
            max_length_q,
            max_length_q,
            scale=scaling,
            window_size=(-1, 0),
            enable_gqa=gqa,
        )
        return out[None], None
    # split, not slices: the backward of a slice writes into zeros of the whole row, once per sequence
    lengths = cu_seq_lens_q.diff().tolist()
    parts = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2), None


def _varlen_mask(*, attention_mask=None, **kwargs):
    """A packed row has no 2D mask and needs none (its boundaries go to the attention); a padded batch gets sdpa's."""
    return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, _varlen_mask)


def use_varlen_attention(model) -> bool:
    """Switch the model to `VARLEN` attention; False for a model that cannot take it (then batches stay padded)."""
    if model.config._attn_implementation not in ("sdpa", "eager", VARLEN):
        return False  # flash or flex attention chosen at load time, or a custom implementation: leave it
    text = model.config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()) or getattr(
        text, "attn_logit_softcapping", None
    ):
        return False  # neither varlen path here knows sliding windows or soft-capped scores
    model.set_attn_implementation(VARLEN)
    return model.config._attn_implementation == VARLEN


@dataclass
class Packed:
    """A right-padded batch (2B, T) as one row of its N real tokens."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    cu_seq_lens: torch.Tensor  # (2B + 1,) int32: where each sequence starts, then N
    max_length: int
    offsets: torch.Tensor  # (2B, T-1): row offset of padded position (i, t); valid where t < length_i

    def model_kwargs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }

    def spread(self, values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Per-token values of the row, (N,), into the padded layout (2B, T-1) at `where`; zero elsewhere."""
        picked = values[self.offsets[where]]
        return picked.new_zeros(where.shape).masked_scatter(where, picked)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack TRL's right-padded batch: sequence i is input_ids[i, :length_i]."""
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    ends = lengths.cumsum(dim=0)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return Packed(
        input_ids=input_ids[real][None],
        position_ids=positions.expand_as(input_ids)[real][None],
        cu_seq_lens=torch.cat([ends.new_zeros(1), ends]).to(torch.int32),
        max_length=int(lengths.max()),
        offsets=(ends - lengths)[:, None] + positions[None, :-1],
    )
