"""An offline word-level tokenizer for the demo's review grammar (no model hub, no training run).

One token per word or punctuation mark of the grammar, plus special tokens; ids are fixed by the
sorted vocabulary, so every call builds the same tokenizer. Text is lower-cased and split on
whitespace and punctuation; decoding joins tokens with spaces and re-attaches punctuation, so
``decode(encode(review))`` gives the review back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlhf_fast.demo.words import vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS: tuple[str, ...] = ("<system>", "<user>", "<assistant>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# "<bos><user> this movie was <eos> <assistant> great! <eos> ": every turn ends in <eos>. The assistant
# turns (content and their <eos>) sit in {% generation %} blocks, so
# apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True) marks them for the loss.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<' + message['role'] + '> ' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<assistant> ' -}}{%- endif -%}"
)


def build_tokenizer(extra_texts: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` covering the whole review grammar, built offline.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the role tokens ``<system>``,
    ``<user>``, ``<assistant>``, then the grammar's words and punctuation in sorted order, then any
    new words of ``extra_texts`` in sorted order. Encoding lower-cases the text and prepends
    ``<bos>`` (Llama's convention; pass ``add_special_tokens=False`` to leave it out, e.g. for a
    completion tokenized apart from its prompt); words outside the vocabulary become ``<unk>``.
    Padding is on the right. ``chat_template`` renders user/assistant (and system) turns, each ended
    by ``<eos>``, with the assistant turns marked as generation blocks.

    Args:
        extra_texts: optional texts whose words (split as the tokenizer splits) join the vocabulary.

    Returns:
        a ``transformers.PreTrainedTokenizerFast``; ``len(tokenizer)`` is the vocabulary size to give
        :func:`rlhf_fast.demo.models.tiny_model`.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(extra_texts, str):
        raise TypeError("extra_texts must be a sequence of str, not a single str")
    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = vocabulary()
    known = set(words) | set(SPECIAL_TOKENS)
    extra: set[str] = set()
    for i, text in enumerate(extra_texts or ()):
        if not isinstance(text, str):
            raise TypeError(f"extra_texts[{i}] must be a str, got {type(text).__name__}")
        extra.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    tokens = [*SPECIAL_TOKENS, *words, *sorted(extra - known)]

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    # Special tokens are matched before normalization and splitting, so "<user>" stays one token.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        clean_up_tokenization_spaces=True,  # "great , and" -> "great, and" on decode
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
    )
