"""The embedded toy VLM: a small stock LLaVA trained here on synthetic VQA.

Why: it lets the whole framework run on a laptop, through exactly the code paths later
used on LLaVA-1.5 or Qwen2-VL checkpoints, with no download.
"""

from __future__ import annotations

from pathlib import Path

TOY_DIRNAME = "toy_vlm"


def toy_vlm_path() -> Path:
    """Directory of the committed toy VLM (``save_pretrained`` format)."""
    return Path(__file__).resolve().parent / TOY_DIRNAME


def load_toy_vlm(attn_implementation: str = "sdpa", path: str | Path | None = None):
    """Load (model, processor) with stock transformers Auto classes; model in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = Path(path) if path is not None else toy_vlm_path()
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no toy VLM at {d}; build it with `python scripts/build_toy_vlm.py --config configs/toy/toy_vlm.yaml`"
        )
    model = AutoModelForImageTextToText.from_pretrained(d, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(d)
    return model.eval(), processor


__all__ = ["load_toy_vlm", "toy_vlm_path"]
