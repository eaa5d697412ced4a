"""Tiny ``transformers`` models with random weights, built from configs (nothing downloaded).

Three families, as the trainers must support them: Llama (untied head by default), GPT-2 (tied input
and output embeddings, learned positions) and Qwen2 (biased q/k/v projections, tied head by default,
as its small checkpoints have). Dropout is 0 everywhere so that a forward pass is a deterministic
function of the weights, in training mode too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_fast.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

KINDS: tuple[str, ...] = ("llama", "gpt2", "qwen2")
_TIED_BY_DEFAULT = {"llama": False, "gpt2": True, "qwen2": True}


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def tiny_config(
    kind: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    tie_word_embeddings: bool | None = None,
    pad_token_id: int = PAD_ID,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
) -> PretrainedConfig:
    """The ``LlamaConfig`` / ``GPT2Config`` / ``Qwen2Config`` behind :func:`tiny_model` (same arguments)."""
    import transformers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("layers", layers),
                        ("heads", heads), ("max_positions", max_positions)):  # fmt: skip
        _check_positive(name, value)
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                        ("eos_token_id", eos_token_id)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    tied = _TIED_BY_DEFAULT[kind] if tie_word_embeddings is None else bool(tie_word_embeddings)
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads, n_positions=max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            tie_word_embeddings=tied, **ids,
        )  # fmt: skip
    config_class = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, attention_dropout=0.0, tie_word_embeddings=tied, **ids,
    )  # fmt: skip


def _build(model_class, config, seed: int):
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    torch.manual_seed(seed)
    model = model_class(config)
    gen = getattr(model, "generation_config", None)
    if gen is not None:  # sampling stops at <eos> and pads with <pad>, as the tokenizer does
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
            config.pad_token_id, config.bos_token_id, config.eos_token_id
        )  # fmt: skip
    return model


def tiny_model(
    kind: str = "llama",
    *,
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    tie_word_embeddings: bool | None = None,
    pad_token_id: int = PAD_ID,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
) -> PreTrainedModel:
    """A float32 causal LM with random weights (``torch.manual_seed(seed)`` first), built from a config.

    Args:
        kind: "llama" (``LlamaForCausalLM``), "gpt2" (``GPT2LMHeadModel``) or "qwen2" (``Qwen2ForCausalLM``).
        vocab_size: rows of the embedding and LM head; ``len(build_tokenizer())`` for the demo.
        seed: weight initialisation seed.
        hidden_size, layers, heads: width (a multiple of ``heads``), depth and attention heads
            (no grouped-query sharing); the MLP is ``4 * hidden_size`` wide.
        max_positions: longest sequence the model accepts (GPT-2's learned positions need it).
        tie_word_embeddings: share the input embedding with the LM head; None is the family's
            default (llama: no, gpt2: yes, qwen2: yes).
        pad_token_id, bos_token_id, eos_token_id: written to the config and the generation config;
            the defaults are :func:`rlhf_fast.demo.tokenizer.build_tokenizer`'s ids.

    Returns:
        the model; its forward gives ``logits`` of shape ``[B, T, vocab_size]``.
    """
    import transformers

    config = tiny_config(
        kind, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
        max_positions=max_positions, tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )  # fmt: skip
    classes = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
               "qwen2": transformers.Qwen2ForCausalLM}  # fmt: skip
    return _build(classes[kind], config, seed)


def tiny_reward_model(
    kind: str = "llama",
    *,
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    pad_token_id: int = PAD_ID,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
) -> PreTrainedModel:
    """A ``<Family>ForSequenceClassification`` with ``num_labels=1``: the same backbone as
    :func:`tiny_model` with a scalar score head, read at the last non-``<pad>`` token of each row
    (so right padding works). Its forward gives ``logits`` of shape ``[B, 1]``, the reward."""
    import transformers

    config = tiny_config(
        kind, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads,
        max_positions=max_positions, tie_word_embeddings=False, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )  # fmt: skip
    config.num_labels = 1
    classes = {"llama": transformers.LlamaForSequenceClassification,
               "gpt2": transformers.GPT2ForSequenceClassification,
               "qwen2": transformers.Qwen2ForSequenceClassification}  # fmt: skip
    return _build(classes[kind], config, seed)
