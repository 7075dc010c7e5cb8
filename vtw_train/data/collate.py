"""Collation through the model's own processor.

Why the processor: the chat template, image-token expansion and padding side are the
model's business; doing them by hand would silently diverge between LLaVA, Qwen2-VL and
the toy. Labels are -100 everywhere except the assistant's answer tokens (and the
end-of-turn token the template puts after them), which is what supervised VQA trains on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from vtw_train.data.records import VQARecord, load_image, turn_to_message

IGNORE_INDEX = -100


class ImageTokenMismatchError(ValueError):
    """The processor produced a different number of image tokens than the vision tower will."""


class VLMCollator:
    """Turn records into model inputs.

    ``mode="train"``: full conversations, right padding, ``labels`` masked to answers.
    ``mode="generate"``: prompts ending in the generation prompt, left padding (so new
    tokens append to every row), plus ``answers``/``question_types``/``ids`` lists.
    """

    def __init__(
        self,
        processor: Any,
        mode: Literal["train", "generate"] = "train",
        max_length: int | None = None,
        expected_image_tokens: int | None = None,
    ) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        self.processor = processor
        self.mode = mode
        self.max_length = max_length
        self.expected_image_tokens = expected_image_tokens
        tok = getattr(processor, "tokenizer", processor)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None and getattr(tok, "image_token", None):
            self.image_token_id = tok.convert_tokens_to_ids(tok.image_token)

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _process(self, texts: list[str], images: list, padding_side: str, records=()) -> dict:
        try:
            return self._process_unchecked(texts, images, padding_side)
        except ValueError as e:
            if "token count" not in str(e):
                raise
            names = ", ".join(r.source for r in records) or "batch"
            raise ImageTokenMismatchError(f"{names}: {e}") from e

    def _process_unchecked(self, texts: list[str], images: list, padding_side: str) -> dict:
        kwargs: dict[str, Any] = {"padding": True, "padding_side": padding_side, "return_tensors": "pt"}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        if any(images):
            return self.processor(images=images, text=texts, **kwargs)
        return self.processor(text=texts, **kwargs)

    def _check_image_tokens(self, batch: dict, records: Sequence[VQARecord]) -> None:
        if self.image_token_id is None or self.expected_image_tokens is None:
            return
        counts = (batch["input_ids"] == self.image_token_id).sum(dim=1)
        for rec, n in zip(records, counts.tolist(), strict=True):
            want = self.expected_image_tokens * len(rec.images)
            if n != want:
                raise ImageTokenMismatchError(
                    f"{rec.source}: {n} image tokens after processing, expected {want} "
                    "(truncated by max_length, or the processor does not match the model?)"
                )

    def __call__(self, records: Sequence[VQARecord]) -> dict[str, Any]:
        images = [[load_image(im) for im in r.images] for r in records]
        flat_images = [im for ims in images for im in ims]
        if self.mode == "generate":
            texts = []
            for r in records:
                turns = r.turns[:-1] if r.turns and r.turns[-1].role == "assistant" else r.turns
                texts.append(self._template([turn_to_message(t) for t in turns], True))
            batch = dict(self._process(texts, flat_images, "left", records))
            self._check_image_tokens(batch, records)
            batch["answers"] = [r.answer for r in records]
            batch["question_types"] = [r.question_type for r in records]
            batch["ids"] = [r.id for r in records]
            return batch

        # Train: label spans [len(prompt_i), len(prompt_i + answer_i)) for each assistant turn i.
        full_texts, spans_texts = [], []
        for r in records:
            msgs = [turn_to_message(t) for t in r.turns]
            full_texts.append(self._template(msgs, False))
            spans = []
            for i, t in enumerate(r.turns):
                if t.role == "assistant":
                    spans.append((self._template(msgs[:i], True), self._template(msgs[: i + 1], False)))
            spans_texts.append(spans)
        batch = dict(self._process(full_texts, flat_images, "right", records))
        self._check_image_tokens(batch, records)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        image_tokens = (
            (batch["input_ids"] == self.image_token_id).sum(dim=1).tolist()
            if self.image_token_id is not None
            else None
        )
        jobs = [(j, a, b) for j, spans in enumerate(spans_texts) for a, b in spans]
        texts = [t for _, a, b in jobs for t in (a, b)]
        rows = [j for j, _, _ in jobs for _ in range(2)]
        lengths = self._lengths(
            texts, [images[j] for j in rows], [image_tokens[j] if image_tokens else None for j in rows]
        )
        for (j, _, _), a, b in zip(jobs, lengths[0::2], lengths[1::2], strict=True):
            labels[j, a:b] = batch["input_ids"][j, a:b]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def _lengths(self, texts: list[str], images: list[list], image_tokens: list[int | None]) -> list[int]:
        """Token counts of prompt prefixes, as the full batch tokenizes them.

        Why not just run the processor on every prefix: that preprocesses every image once
        per assistant turn, which dominated collation time for multi-turn data. A prefix
        holding none of its record's images, or all of them, goes through the tokenizer
        alone, as the processor would tokenize it (each placeholder stays one token), and is
        corrected by the record's image-token count from the full batch (``image_tokens``).
        Only a prefix holding some but not all of a record's images, whose per-image
        expansion may differ, goes through the processor with those images.
        """
        placeholders = [tx.count(self._image_marker) for tx in texts]
        out: list[int | None] = [None] * len(texts)
        text_only, slow = [], []
        for i, (k, ims, n_tok) in enumerate(zip(placeholders, images, image_tokens, strict=True)):
            (text_only if k == 0 or (n_tok is not None and k == len(ims)) else slow).append(i)
        if text_only:
            tok = getattr(self.processor, "tokenizer", self.processor)
            counts = [len(ids) for ids in tok([texts[i] for i in text_only])["input_ids"]]
            for i, n in zip(text_only, counts, strict=True):
                k = placeholders[i]
                out[i] = n + (image_tokens[i] - k if k else 0)
        for i in slow:
            out[i] = (
                self._process([texts[i]], images[i][: placeholders[i]], "right")["attention_mask"]
                .sum()
                .item()
            )
        return out  # type: ignore[return-value]

    @property
    def _image_marker(self) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return getattr(self.processor, "image_token", None) or getattr(tok, "image_token", "<image>")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch (drops ``answers``, ``ids``, ``question_types``)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def collated_batches(
    records: Sequence[VQARecord], collate: VLMCollator, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-input batches of ``records`` in order (calibration, layer-contribution and timing runs)."""
    for start in range(0, len(records), batch_size):
        yield model_inputs(collate(list(records[start : start + batch_size])))
