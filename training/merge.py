"""`python -m training merge BASE ADAPTER OUT`: a LoRA adapter merged into its base, saved as a folder that
`AutoModelForCausalLM.from_pretrained` loads (fp32 weights, safetensors), with the adapter's tokenizer (or the
base's where the adapter has none). `prefq export --format merged` runs it for a LoRA checkpoint."""

from __future__ import annotations

from pathlib import Path


def merge(base: str, adapter: str, out: str, revision: str | None = None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    has_tokenizer = any((Path(adapter) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    AutoTokenizer.from_pretrained(
        adapter if has_tokenizer else base, revision=None if has_tokenizer else revision
    ).save_pretrained(out)
