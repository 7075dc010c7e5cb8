"""A miniature toy VLM round-trips through save_pretrained and stock transformers Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from vtw_train.data import VLMCollator, from_sample
from vtw_train.data.synthetic import generate_samples
from vtw_train.toy.build import _sincos_2d, build_model, build_processor, miniature_arch
from vtw_train.toy.config import ConfigError, load_config
from vtw_train.toy.train import ResumeError, lr_factor, save_atomically


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    arch = miniature_arch()
    processor = build_processor(arch)
    model = build_model(arch, processor.tokenizer, seed=0).eval()
    out = tmp_path_factory.mktemp("mini") / "toy"
    save_atomically(model, processor, out, {"step": 0})
    return model, processor, out


def test_saved_files_are_standard(mini):
    _, _, out = mini
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == "llama"


def test_loads_with_stock_transformers_only(mini):
    """A fresh interpreter that never imports vtw_train gets identical logits."""
    model, processor, out = mini
    rec = from_sample(generate_samples(1, seed=3)[0])
    batch = VLMCollator(processor, "generate")([rec])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"]).logits[0, -1]  # fmt: skip
    torch.save(
        {"image": rec.images[0].tobytes(), "q": rec.turns[0].text[len("<image>\n") :]}, out.parent / "in.pt"
    )
    code = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        d = {str(out)!r}
        m = AutoModelForImageTextToText.from_pretrained(d).eval()
        p = AutoProcessor.from_pretrained(d)
        assert type(p.image_processor).__name__ == "CLIPImageProcessorPil", type(p.image_processor)
        inp = torch.load({str(out.parent / "in.pt")!r})
        img = Image.frombytes("RGB", (64, 64), inp["image"])
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": inp["q"]}}]}}]
        text = p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = p(images=[img], text=[text], return_tensors="pt")
        with torch.no_grad():
            torch.save(m(**enc).logits[0, -1], {str(out.parent / "out.pt")!r})
        assert "vtw_train" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=out.parent)
    got = torch.load(out.parent / "out.pt")
    assert torch.allclose(got, ref, atol=1e-5)


def test_generate_runs_and_stops(mini):
    model, processor, _ = mini
    recs = [from_sample(s) for s in generate_samples(3, seed=1)]
    batch = VLMCollator(processor, "generate")(recs)
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
    )
    assert out.shape[0] == 3 and out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_build_is_deterministic_for_a_seed():
    arch = miniature_arch()
    p = build_processor(arch)
    a, b, c = (
        build_model(arch, p.tokenizer, seed=1),
        build_model(arch, p.tokenizer, seed=1),
        build_model(arch, p.tokenizer, seed=2),
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_position_code_encodes_rows_and_columns():
    code = _sincos_2d(8, 32)
    assert code.shape == (64, 32)
    assert len({tuple(r.tolist()) for r in code}) == 64  # every cell distinct
    # Row half is identical along a row; column half identical along a column.
    assert torch.allclose(code[0, :16], code[7, :16]) and not torch.allclose(code[0, 16:], code[7, 16:])


def test_full_config_meets_the_size_budgets():
    cfg = load_config("configs/toy/toy_vlm.yaml")
    p = build_processor(cfg.arch)
    from transformers import LlavaForConditionalGeneration

    from vtw_train.toy.build import build_config

    with torch.device("meta"):
        m = LlavaForConditionalGeneration(build_config(cfg.arch, p.tokenizer))
    n = sum(x.numel() for x in m.parameters()) - m.get_input_embeddings().weight.numel()  # tied head
    assert n * 4 <= 20e6, f"{n} parameters exceed 20 MB in float32"
    assert cfg.arch.text_layers >= 8
    assert (cfg.arch.image_size // cfg.arch.patch_size) ** 2 >= 64


def test_config_rejects_unknown_keys(tmp_path):
    good = yaml.safe_load(open("configs/toy/toy_vlm.yaml"))
    good["train"]["lr_typo"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(good))
    with pytest.raises(ConfigError, match="lr_typo"):
        load_config(path)
    good["train"].pop("lr_typo")
    good["arch"]["curriculum"] = 1
    path.write_text(yaml.safe_dump(good))
    with pytest.raises(ConfigError, match="arch"):
        load_config(path)


def test_config_rejects_unknown_question_types_at_load(tmp_path):
    """A misspelt curriculum type fails when the config is read, naming the phase, not mid-build."""
    cfg = yaml.safe_load(open("configs/toy/toy_vlm.yaml"))
    cfg["train"]["curriculum"][1]["type_weights"]["spatail"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"train\.curriculum\[1\].*'spatail'.*same_size"):
        load_config(path)
    # The opt-in one-object size type is accepted.
    cfg["train"]["curriculum"][1]["type_weights"] = {"size": 1, "same_size": 1}
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).train.curriculum[1].type_weights == {"size": 1, "same_size": 1}


def test_config_refuses_more_than_one_data_worker_at_load(tmp_path):
    """Two workers would each draw from a copy of the one generator stream: refused when read."""
    cfg = yaml.safe_load(open("configs/toy/toy_vlm.yaml"))
    cfg["train"]["data_workers"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"train\.data_workers must be 0 or 1.*got 2"):
        load_config(path)


def test_lr_schedule_shape():
    cfg = load_config("configs/toy/toy_vlm.yaml").train
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[0] < 0.05 and f[cfg.warmup_steps] == 1.0
    assert f[int(0.69 * cfg.steps)] == 1.0
    assert f[-1] < 0.05 and all(
        x >= y - 1e-9 for x, y in zip(f[cfg.warmup_steps :], f[cfg.warmup_steps + 1 :], strict=False)
    )


def test_prompt_order_option():
    from vtw_train.toy.build import ToyArchConfig

    p = build_processor(ToyArchConfig(prompt_order="question_first"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many objects ?"}]}]
    text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.index("how many") < text.index("<image>") and text.endswith("ASSISTANT:")
    with pytest.raises(ValueError, match="prompt_order"):
        build_processor(ToyArchConfig(prompt_order="sideways"))


def test_training_is_deterministic_for_a_seed_and_saves_a_finished_model(tmp_path):
    """Two short runs (vision stage, then multi-question VLM stage) give bit-identical weights,
    and a frozen tower leaves the VLM stage with exactly the tower stage 0 trained."""
    from safetensors.torch import load_file

    from vtw_train.toy.build import miniature_arch
    from vtw_train.toy.config import PhaseConfig, ToyBuildConfig, TrainConfig
    from vtw_train.toy.train import train
    from vtw_train.toy.vision_pretrain import VisionPretrainConfig, pretrain_vision_tower

    vision = VisionPretrainConfig(steps=2, batch_size=4, warmup_steps=1)
    cfg = ToyBuildConfig(
        arch=miniature_arch(),
        vision_pretrain=vision,
        train=TrainConfig(
            steps=3,
            batch_size=4,
            questions_per_image=3,
            warmup_steps=1,
            eval_every=3,
            eval_samples=8,
            checkpoint_every=3,
            curriculum=[
                PhaseConfig(until_fraction=0.5, type_weights={"color": 1}, min_objects=1, max_objects=1)
            ],
        ),
    )
    acc = train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    assert set(acc) >= {"overall"} and 0.0 <= acc["overall"] <= 1.0
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "a" / "training_info.json").read_text())
    assert info["step"] == info["steps"] == 3
    processor = build_processor(cfg.arch)
    stage0 = build_model(cfg.arch, processor.tokenizer, seed=0)
    pretrain_vision_tower(stage0, processor.image_processor, vision, seed=0)
    tower = {k: v for k, v in stage0.state_dict().items() if k.startswith("model.vision_tower.")}
    assert all(torch.equal(a[k.removeprefix("model.")], v) for k, v in tower.items())
    fresh = build_model(cfg.arch, processor.tokenizer, seed=0).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in tower.items())


def _split_cfg(steps: int = 4, data_workers: int = 1):
    from vtw_train.toy.build import miniature_arch
    from vtw_train.toy.config import PhaseConfig, ToyBuildConfig, TrainConfig
    from vtw_train.toy.vision_pretrain import VisionPretrainConfig

    return ToyBuildConfig(
        arch=miniature_arch(),
        vision_pretrain=VisionPretrainConfig(steps=2, batch_size=4, warmup_steps=1),
        train=TrainConfig(
            steps=steps,
            batch_size=4,
            questions_per_image=2,
            warmup_steps=1,
            flat_fraction=0.25,
            data_workers=data_workers,
            eval_every=2,
            eval_samples=8,
            checkpoint_every=100,
            curriculum=[
                PhaseConfig(until_fraction=0.5, type_weights={"color": 1}, min_objects=1, max_objects=1),
                PhaseConfig(until_fraction=1.0, type_weights={"count": 1, "shape": 1}),
            ],
        ),
    )


def _monitor_records(path):
    """A build's monitor log without its wall-clock field, so two runs' logs can be compared."""
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in path.open()]


def test_a_build_split_by_stop_after_and_resume_equals_the_uninterrupted_build(tmp_path):
    """Stopping mid-run (mid-schedule, at a phase change) and resuming gives bit-identical
    weights and the same monitor log: the optimizer, schedule and generator state all travel.
    The uninterrupted build prepares its batches in the training process, the split one in a
    background worker: the stream and the weights do not depend on it."""
    from safetensors.torch import load_file

    from vtw_train.toy.train import TRAINER_STATE, train

    cfg = _split_cfg()
    whole = train(_split_cfg(data_workers=0), tmp_path / "whole", tmp_path / "whole.jsonl")
    train(cfg, tmp_path / "split", tmp_path / "split.jsonl", stop_after=2)
    assert (tmp_path / "split" / TRAINER_STATE).is_file()
    assert json.loads((tmp_path / "split" / "training_info.json").read_text())["step"] == 2
    resumed = train(cfg, tmp_path / "split", tmp_path / "split.jsonl", resume=True)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == whole
    whole_log = _monitor_records(tmp_path / "whole.jsonl")
    assert [r["step"] for r in whole_log] == [2, 4]
    assert _monitor_records(tmp_path / "split.jsonl") == whole_log
    # the finished model carries no trainer state, so it cannot be "resumed" by mistake
    assert not (tmp_path / "split" / TRAINER_STATE).exists()


def test_resume_drops_monitor_records_logged_after_the_checkpoint(tmp_path):
    """A run killed after its last checkpoint has logged evaluations the resumed run repeats."""
    from vtw_train.toy.train import train

    cfg = _split_cfg()
    train(cfg, tmp_path / "whole", tmp_path / "whole.jsonl")
    train(cfg, tmp_path / "split", tmp_path / "split.jsonl", stop_after=2)
    with (tmp_path / "split.jsonl").open("a") as f:  # what the killed run wrote after step 2
        f.write(json.dumps({"step": 4, "loss": 9.0, "overall": 0.0}) + "\n")
    train(cfg, tmp_path / "split", tmp_path / "split.jsonl", resume=True)
    assert _monitor_records(tmp_path / "split.jsonl") == _monitor_records(tmp_path / "whole.jsonl")


def test_resume_refuses_a_config_that_changes_the_steps_already_trained(tmp_path):
    import dataclasses

    from vtw_train.toy.config import PhaseConfig
    from vtw_train.toy.train import train

    cfg = _split_cfg()
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(cfg, tmp_path / "run", resume=True)
    train(cfg, tmp_path / "run", stop_after=2)
    early = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            curriculum=[PhaseConfig(until_fraction=1.0, type_weights={"shape": 1})],
        ),
    )
    with pytest.raises(ResumeError, match=r"train\.curriculum \(differs at step 0\)"):
        train(early, tmp_path / "run", resume=True)
    with pytest.raises(ResumeError, match=r"train\.lr"):
        train(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-3)),
            tmp_path / "run",
            resume=True,
        )
    # changing only what comes after the checkpoint is how a run is given another ending
    late = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            curriculum=[cfg.train.curriculum[0], PhaseConfig(until_fraction=1.0, type_weights={"exists": 1})],
        ),
    )
    train(late, tmp_path / "run", resume=True)
    with pytest.raises(ResumeError, match="finished model"):
        train(late, tmp_path / "run", resume=True)
    with pytest.raises(ResumeError, match="stop_after"):
        train(cfg, tmp_path / "other", stop_after=4)


def test_build_script_resume_without_a_checkpoint_says_so(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "build_toy_vlm.py"
    monkeypatch.setattr(sys, "argv", ["build_toy_vlm.py", "--output_dir", str(tmp_path / "none"), "--resume"])
    with pytest.raises(
        SystemExit, match="cannot resume: no checkpoint in .*none; start a new build without --resume"
    ):
        runpy.run_path(str(script), run_name="__main__")
    assert not (tmp_path / "none").exists()
