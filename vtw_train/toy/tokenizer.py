"""A word-level tokenizer for the toy VLM, built with the ``tokenizers`` library.

Why word-level: the synthetic questions use ~60 words, and one token per word keeps
the text part of the prompt short, so the 64 visual tokens dominate the prompt the way
576 do in LLaVA-1.5.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vtw_train.data.synthetic import vocabulary

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE)
#: Words of the chat template (lowercased by the normalizer).
TEMPLATE_WORDS = ("user", "assistant", ":")

#: Minimal LLaVA-1.5-style template: ``USER: <image>\n{question} ASSISTANT: {answer}</s>``.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Variant with the question before the image (``USER: {question}\n<image> ASSISTANT:``), an
#: order LLaVA-1.5's own training data also uses; the visual tokens can then read the question.
CHAT_TEMPLATE_QUESTION_FIRST = CHAT_TEMPLATE.replace(
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}",
    "{% for c in m['content'] %}{% if c['type'] != 'image' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}\n<image>{% endif %}{% endfor %}",
)


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, BOS prepended."""
    words = list(SPECIALS) + list(TEMPLATE_WORDS) + vocabulary() + list(extra_words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
