"""The model families users train, as tiny random models: each family's architecture, special tokens and chat format.

`make_tiny_model(path, size, family=...)` builds one. The architectures are transformers' own classes with a few
hidden units; the tokenizer is the local BPE of `training.tiny` with the family's special tokens added, and the
chat template renders the family's published format (turn markers, system and tool handling, the tokens that end
a turn, what it refuses), written here from the facts of the families' tokenizer configs:

  qwen2      Qwen 2.5: ChatML, a default system turn, tools and `<tool_call>` JSON, tool results as a user turn
  qwen3      Qwen 3: ChatML, an empty `<think>` block on the assistant turns after the last question (and only
             there, so a turn renders differently once another follows), q/k norms
  qwen3_moe  Qwen 3's format on a mixture of experts (4 experts, 2 per token)
  llama3     Llama 3.1: header markers, a system turn with dates, tools in the first user turn, one tool call per
             turn (it refuses parallel calls), tool results as `ipython`; no pad token
  mistral    Mistral v0.3: `[INST]`, `[AVAILABLE_TOOLS]` and the system prompt on the last question, `[TOOL_CALLS]`
             with 9-character ids, `[TOOL_RESULTS]`; no pad token
  gemma2     Gemma 2: `<start_of_turn>` with the role `model`, no system role, no tools; soft-capped logits,
             sliding-window layers
  gemma3     Gemma 3 (text): Gemma's turns with the system prompt folded into the first question
  phi3       Phi-3: `<|user|>`/`<|assistant|>`/`<|end|>`, the end-of-text token after a conversation that does
             not ask for a reply; fused qkv and gate-up projections
  gpt2       GPT-2: no chat template (prompt/completion data only), Conv1D layers, no pad token
  olmo2      OLMo 2 (Tülu 3 format): `<|user|>`/`<|assistant|>`, the end-of-text token closing each answer
"""

from __future__ import annotations

from dataclasses import dataclass, field

_QWEN_TOOLS = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)
# The turns of Qwen 2.5 and Qwen 3; THINK is what an assistant turn opens with (Qwen 3's empty think block).
_QWEN_TURNS = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{% if not loop.first %}<|im_start|>system\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% elif message.role == 'user' %}<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n"
    "THINK"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2 = (
    "{% set system = messages[0].content if messages and messages[0].role == 'system' "
    "else 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}"
    "<|im_start|>system\n{{ system }}{% if tools %}"
    + _QWEN_TOOLS
    + "{% endif %}<|im_end|>\n"
    + _QWEN_TURNS.replace("THINK", "")
)
QWEN3 = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    + _QWEN_TOOLS.removeprefix("\n\n")
    + "<|im_end|>\n{% elif messages and messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    + _QWEN_TURNS.replace(
        "THINK", "{% if loop.index0 > ns.last_query and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    )
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{% if tools %}Environment: ipython\n{% endif %}"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ system }}<|eot_id|>"
    "{% for message in messages %}"
    "{% if tools and loop.first and message.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
    "{% for tool in tools %}{{ tool | tojson(indent=4) }}\n\n{% endfor %}{{ message.content }}<|eot_id|>"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "{% if message.tool_calls | length != 1 %}{{ raise_exception('This model only supports single tool-calls at "
    "once!') }}{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "{{ message.tool_calls[0].function.name }}", "parameters": '
    "{{ message.tool_calls[0].function.arguments | tojson }}}<|eot_id|>"
    "{% elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in loop_messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message.role == 'user' %}"
    "{% if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS] ["
    "{% for tool in tools %}{{ tool | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}][/AVAILABLE_TOOLS]"
    "{% endif %}[INST] {% if system and loop.index0 == ns.last_user %}{{ system }}\n\n{% endif %}"
    "{{ message.content }}[/INST]"
    "{% elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] ["
    "{% for call in message.tool_calls %}"
    "{% if call.id is not defined or call.id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}, "id": "{{ call.id }}"}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif message.role == 'assistant' %} {{ message.content }}{{ eos_token }}"
    "{% elif message.role == 'tool' %}[TOOL_RESULTS] "
    '{"content": {{ message.content | tojson }}, "call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]'
    "{% else %}{{ raise_exception('Only user, assistant and tool roles are supported, after an optional system "
    "message!') }}{% endif %}{% endfor %}"
)
_GEMMA_TURNS = (
    "{% for message in loop_messages %}"
    "{% if message.role not in ['user', 'assistant'] %}{{ raise_exception('Conversation roles must be user or "
    "assistant') }}{% endif %}"
    "{% if (message.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message.role == 'assistant' else 'user' }}\n"
    "{% if loop.first %}{{ first_prefix }}{% endif %}{{ message.content | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages and messages[0].role == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set loop_messages = messages %}{% set first_prefix = '' %}" + _GEMMA_TURNS
)
GEMMA3 = (
    "{{ bos_token }}{% if messages and messages[0].role == 'system' %}"
    "{% set first_prefix = messages[0].content + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set loop_messages = messages %}{% endif %}" + _GEMMA_TURNS
)
PHI3 = (
    "{% for message in messages %}"
    "{% if message.role in ['system', 'user', 'assistant'] %}<|{{ message.role }}|>\n{{ message.content }}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'system' %}<|system|>\n{{ message.content }}\n"
    "{% elif message.role == 'user' %}<|user|>\n{{ message.content }}\n"
    "{% elif message.role == 'assistant' %}<|assistant|>\n{{ message.content }}{{ eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}<|assistant|>\n{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    config: str  # the transformers config class
    template: str | None
    bos: str | None
    eos: str
    pad: str | None  # None: the family's tokenizer has no pad token
    tokens: tuple[str, ...] = ()  # more tokens held whole (the markers of the chat format)
    config_args: dict = field(default_factory=dict)
    tools: bool = False  # the format renders `tools` and tool calls

    def specials(self) -> list[str]:
        return list(dict.fromkeys(t for t in (self.bos, self.eos, self.pad, *self.tokens) if t))


_CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<think>", "</think>")
_QWEN3_SIZES = {"head_dim": 16}
FAMILIES = {
    "qwen2": Family("Qwen2Config", QWEN2, None, "<|im_end|>", "<|endoftext|>", _CHATML, tools=True),
    "qwen3": Family("Qwen3Config", QWEN3, None, "<|im_end|>", "<|endoftext|>", _CHATML, _QWEN3_SIZES, tools=True),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        QWEN3,
        None,
        "<|im_end|>",
        "<|endoftext|>",
        _CHATML,
        {**_QWEN3_SIZES, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        tools=True,
    ),
    "llama3": Family(
        "LlamaConfig",
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"),
        {"rope_theta": 500000.0},
        tools=True,
    ),
    "mistral": Family(
        "MistralConfig",
        MISTRAL,
        "<s>",
        "</s>",
        None,
        (
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        {"sliding_window": None},
        tools=True,
    ),
    "gemma2": Family(
        "Gemma2Config",
        GEMMA2,
        "<bos>",
        "<eos>",
        "<pad>",
        ("<start_of_turn>", "<end_of_turn>"),
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3": Family(
        "Gemma3TextConfig",
        GEMMA3,
        "<bos>",
        "<eos>",
        "<pad>",
        ("<start_of_turn>", "<end_of_turn>"),
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512},
    ),
    "phi3": Family(
        "Phi3Config",
        PHI3,
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
    ),
    "gpt2": Family("GPT2Config", None, "<|endoftext|>", "<|endoftext|>", None),
    "olmo2": Family(
        "Olmo2Config",
        OLMO2,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
        ("<|system|>", "<|user|>", "<|assistant|>"),
    ),
}


def build_config(
    family: str | None,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    tied: bool,
    token_ids: dict,
):
    """The transformers config of `family` (None: the default Llama) at the given size; token_ids: bos/eos/pad ids
    (None where absent)."""
    import transformers

    spec = FAMILIES[family] if family is not None else None
    cls = getattr(transformers, spec.config if spec is not None else "LlamaConfig")
    ids = {f"{k}_token_id": v for k, v in token_ids.items()}
    if family == "gpt2":  # GPT-2's own names, no key-value heads, always a tied head
        sizes = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": intermediate, "n_positions": 2048}
        return cls(vocab_size=vocab_size, tie_word_embeddings=True, **sizes, **ids)
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        **{**ids, **(spec.config_args if spec is not None else {})},
    )
