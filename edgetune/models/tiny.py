"""A tiny Llama and a byte-level chat tokenizer, built in memory for tests and CPU smoke runs.

Nothing is downloaded and no global RNG is touched: the model is constructed on the meta
device (no initialisation draws), materialised empty, and every parameter is filled from a
keyed ``init`` stream of ``crypto.schedule``. The same seed gives bitwise-identical weights
on every platform.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from edgetune.crypto import schedule

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<pad>")
"""Added after the 256 byte tokens, with ids 256, 257, 258."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as SmolLM2-Instruct uses, so the tiny model sees the same prompt layout."""

INIT_SCALE = 0.08
"""Weights are uniform on (-INIT_SCALE, INIT_SCALE); RMSNorm weights are 1."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id ``b`` is byte ``b``, plus ChatML special tokens.

    Returns
    -------
    PreTrainedTokenizerFast
        259 tokens: the 256 bytes (no merges, so any text round-trips), ``<|im_start|>``,
        ``<|im_end|>`` (eos and end of turn) and ``<pad>`` (padding), with a ChatML
        ``chat_template``.
    """
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges, words need not be isolated, and one byte is one token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # Added here, in this order, so the ids are fixed (256, 257, 258) whatever the wrapper does.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> LlamaForCausalLM:
    """A small Llama with keyed, platform-independent initial weights.

    Parameters
    ----------
    tokenizer
        Sets the vocabulary size and the eos/pad ids; ``tiny_tokenizer()`` if None.
    seed
        Run seed; parameter ``name`` is filled from ``derive(run_key(seed), "init", name)``.
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings
        Llama shape (defaults: about 107k parameters with the tiny tokenizer).

    Returns
    -------
    LlamaForCausalLM
        fp32, on CPU, in eval mode, untied embeddings.
    """
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    # On the meta device nn.Linear/nn.Embedding allocate nothing and their default
    # initialisers draw nothing from torch's global generator.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    _fill_parameters(model, seed)
    _restore_buffers(model, config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``tiny_llama(tokenizer, seed=seed)`` and its ``tiny_tokenizer()``."""
    tokenizer = tiny_tokenizer()
    return tiny_llama(tokenizer, seed=seed), tokenizer


@torch.no_grad()
def _fill_parameters(model: torch.nn.Module, seed: int) -> None:
    root = schedule.run_key(seed)
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, LlamaRMSNorm)}
    for name, param in model.named_parameters():
        if name in norms:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            # Keyed per parameter name: adding or reordering layers leaves other tensors unchanged.
            u = schedule.uniform(schedule.derive(root, "init", name), param.numel())
            values = torch.from_numpy((u * 2.0 - 1.0) * INIT_SCALE).to(torch.float32)
            param.copy_(values.view(param.shape))


@torch.no_grad()
def _restore_buffers(model: LlamaForCausalLM, config: LlamaConfig) -> None:
    # to_empty() leaves buffers uninitialised; the only ones a Llama has are the RoPE
    # frequencies, which are computed (not drawn), so rebuild that module on the CPU.
    with torch.device("cpu"):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    unknown = [n for n, _ in model.named_buffers() if not n.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"tiny_llama: buffers {unknown} would stay uninitialised")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of ``pre_tokenizers.ByteLevel``."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))
