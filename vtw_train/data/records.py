"""The in-memory record every reader yields and every collator consumes.

Why a record type: LLaVA JSON, the synthetic generator and a user's own data all
become the same thing before collation, so one collator serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str  # may contain "<image>" placeholders (user turns)


@dataclass
class VQARecord:
    """One conversation with its image(s).

    ``images`` holds paths (loaded lazily by the collator) or already-open PIL images;
    ``source`` is "file:line" so that any later error can still name where it came from.
    """

    id: str
    images: list[Path | Image.Image]
    turns: list[Turn]
    question_type: str | None = None
    source: str = "<memory>"
    extra: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The last assistant turn (the reference answer for evaluation)."""
        for t in reversed(self.turns):
            if t.role == "assistant":
                return t.text
        return ""


def turn_to_message(turn: Turn) -> dict:
    """A HF chat message: user text is split around ``<image>`` into image/text parts."""
    if turn.role == "assistant":
        return {"role": "assistant", "content": [{"type": "text", "text": turn.text.strip()}]}
    content: list[dict] = []
    pieces = turn.text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        piece = piece.strip()
        if piece:
            content.append({"type": "text", "text": piece})
    return {"role": "user", "content": content}


def load_image(img: Path | Image.Image) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    with Image.open(img) as im:
        return im.convert("RGB")


def from_sample(sample, sample_id: str = "") -> VQARecord:
    """Record for an in-memory synthetic :class:`~vtw_train.data.synthetic.Sample`."""
    return from_conversation([sample], sample_id)


def from_conversation(samples, sample_id: str = "") -> VQARecord:
    """Multi-turn record for several synthetic samples about one scene (the image comes once,
    in the first user turn, as in LLaVA-1.5's multi-turn training data)."""
    if not samples:
        raise ValueError("from_conversation needs at least one sample")
    turns: list[Turn] = []
    for i, s in enumerate(samples):
        prefix = f"{IMAGE_PLACEHOLDER}\n" if i == 0 else ""
        turns += [Turn("user", prefix + s.question), Turn("assistant", s.answer)]
    return VQARecord(
        id=sample_id, images=[samples[0].image()], turns=turns, question_type=samples[0].question_type
    )
