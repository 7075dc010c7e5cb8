"""The VQA answer convention: when a generated answer counts as the reference answer.

Short-answer VQA is scored by exact match after normalisation (case, punctuation and spacing
do not count), as VQAv2-style evaluations do. Every score in the project goes through here.
"""

from __future__ import annotations


def answer_normalize(text: str) -> str:
    """Lowercase, strip punctuation and collapse whitespace: the exact-match convention."""
    keep = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower())
    return " ".join(keep.split())


def is_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` is ``answer`` under the exact-match convention."""
    return answer_normalize(prediction) == answer_normalize(answer)
