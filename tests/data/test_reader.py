"""The LLaVA-format reader on good and bad files: errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vtw_train.data import DataFormatError, LlavaJsonDataset
from vtw_train.data.synthetic import generate_dataset


def _rec(
    i: int, image: str | None = "img.png", q: str = "<image>\nwhat color is it ?", a: str = "red"
) -> dict:
    r = {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "img.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _write_jsonl(path: Path, items: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in items) + "\n")
    return path


def test_reads_generated_dataset(tmp_path):
    path = generate_dataset(tmp_path, 10, seed=0)
    ds = LlavaJsonDataset(path)
    assert len(ds) == 10 and ds.num_skipped == 0
    r = ds[0]
    assert r.images[0].is_file() and r.question_type and r.turns[0].role == "user"
    assert r.answer == json.loads(path.read_text().splitlines()[0])["conversations"][1]["value"]


def test_json_list_and_text_only_records(folder):
    path = folder / "d.json"
    path.write_text(json.dumps([_rec(0), _rec(1, image=None, q="hello ?", a="hi")]))
    ds = LlavaJsonDataset(path)
    assert len(ds) == 2 and ds[1].images == []


def test_image_root_override(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = _write_jsonl(other / "d.jsonl", [_rec(0)])
    with pytest.raises(DataFormatError, match="image not found"):
        LlavaJsonDataset(path)
    assert len(LlavaJsonDataset(path, image_root=folder)) == 1


BAD = {
    "missing image": (_rec(1, image="nope.png"), "image not found", "image"),
    "unreadable image": (_rec(1, image="broken.png"), "unreadable image", "image"),
    "empty conversation": ({"id": "1", "image": "img.png", "conversations": []}, "empty", "empty"),
    "no placeholder": (_rec(1, q="what color ?"), "0 '<image>' placeholder", "mismatch"),
    "two placeholders": (_rec(1, q="<image> <image> what ?"), "2 '<image>' placeholder", "mismatch"),
    "empty answer": (_rec(1, a="  "), "empty gpt answer", "empty"),
    "bad json": ('{"id": 1, "conversations": [', "invalid JSON", "json"),
    "bad role": ({"id": "1", "conversations": [{"from": "robot", "value": "x"}]}, "turn 0", "turn"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_sample_raises_naming_file_and_line(folder, name):
    bad, message, _ = BAD[name]
    path = _write_jsonl(folder / "d.jsonl", [_rec(0), bad, _rec(2)])
    with pytest.raises(DataFormatError) as e:
        LlavaJsonDataset(path)
    assert f"{path}:2" in str(e.value)
    assert message in str(e.value)


def test_skip_mode_counts_every_skipped_sample(folder, caplog):
    items = [_rec(0)] + [BAD[k][0] for k in BAD] + [_rec(99)]
    path = _write_jsonl(folder / "d.jsonl", items)
    with caplog.at_level("WARNING"):
        ds = LlavaJsonDataset(path, on_error="skip")
    assert len(ds) == 2
    assert ds.num_skipped == len(BAD)
    assert sum(ds.skipped.values()) == len(BAD)
    assert ds.skipped["image"] == 2 and ds.skipped["mismatch"] == 2
    assert [s for s, _ in ds.errors] == [f"{path}:{i}" for i in range(2, 2 + len(BAD))]
    assert f"skipped {len(BAD)} sample" in caplog.text


def test_json_list_errors_name_the_item(folder):
    path = folder / "d.json"
    path.write_text(json.dumps([_rec(0), _rec(1, image="nope.png")]))
    with pytest.raises(DataFormatError, match=r"\[item 1\]: image not found"):
        LlavaJsonDataset(path)


def test_invalid_options_and_missing_file(folder):
    with pytest.raises(ValueError, match="on_error"):
        LlavaJsonDataset(_write_jsonl(folder / "d.jsonl", [_rec(0)]), on_error="ignore")
    with pytest.raises(FileNotFoundError):
        LlavaJsonDataset(folder / "absent.jsonl")
