"""Small random-initialised models (a Llama by default, or any family of `training.families`) with a locally
trained byte-level BPE tokenizer.

No hub is needed: the tokenizer is trained with `tokenizers` on local text (`toy_data.corpus`), and both
model and tokenizer reload with `AutoModelForCausalLM` / `AutoTokenizer` from the folder.
"""

from __future__ import annotations

from pathlib import Path

# Tools as a system turn and tool calls as `<tool_call>{json}</tool_call>`, the way Qwen 2.5's template does.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# name: (hidden, layers, heads, key-value heads, intermediate, model vocab size (None: the tokenizer's), tied head)
SIZES = {
    "micro": (64, 2, 4, 4, 128, None, True),  # ~150k parameters: fast tests
    "tiny": (128, 4, 4, 4, 384, None, True),  # ~1M parameters: the default
    "small": (384, 6, 6, 6, 1024, 16384, False),  # ~25M parameters: CPU benchmarks
    "qwen-0.5b": (896, 24, 14, 2, 4864, 151936, True),  # Qwen2.5-0.5B's shapes in a Llama, 494M: GPU benchmarks
}


def _train_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from training.toy_data import corpus

    tok = Tokenizer(models.BPE())
    # Digits one by one, as in Llama 3 and Qwen: numbers compare digit by digit, which a small model can learn
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 2048, family: str | None = None):
    """The local tokenizer: our own chat markers, or a family's special tokens, chat template and pad token."""
    from transformers import PreTrainedTokenizerFast

    if family is None:
        return PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(vocab_size, SPECIAL_TOKENS),
            pad_token="<|pad|>",
            bos_token="<|bos|>",
            eos_token="<|eos|>",
            chat_template=CHAT_TEMPLATE,
        )
    from training.families import FAMILIES

    f = FAMILIES[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size, f.specials()),
        bos_token=f.bos,
        eos_token=f.eos,
        pad_token=f.pad,
        additional_special_tokens=[t for t in f.tokens if t not in (f.bos, f.eos, f.pad)],
        chat_template=f.template,
    )


def make_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, family: str | None = None) -> int:
    """Write a model folder (a Llama with our chat markers, or `family`'s architecture and format); returns its
    parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from training.families import build_config

    if size not in SIZES:
        raise ValueError(f"Unknown size: {size}; choose from {', '.join(SIZES)}")
    hidden, layers, heads, kv_heads, intermediate, vocab, tied = SIZES[size]
    tokenizer = build_tokenizer(family=family)
    vocab_size = max(vocab or 0, len(tokenizer))
    ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = build_config(family, vocab_size, hidden, layers, heads, kv_heads, intermediate, tied, ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config) if family is None else AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
