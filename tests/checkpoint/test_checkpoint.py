"""The gated checkpoint (docs/methods.md §14.3/§14.4): bit-exact round trip, layout, and clear errors.

Why these tests: a LoRA adapter loads onto any base of the right shape without complaint, so
the failure modes that matter are silent ones (wrong base, corrupt file, a LoRA that leaked
onto the vision tower). Each is provoked here and must fail loudly, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from vtw_train.adapters import lora_outside_language_model
from vtw_train.calibration import CalibrationConfig, calibrate
from vtw_train.checkpoint import (
    FORMAT,
    GatedVLM,
    export_gated_checkpoint,
    verify_checkpoint,
)
from vtw_train.engine import attach
from vtw_train.fingerprint import model_fingerprint
from vtw_train.gate import ExitGate, GateConfig, policy_reduction
from vtw_train.tiny_models import IMAGE_TOKEN_ID, tiny_inputs, tiny_model

NUM_LAYERS = 4
HIDDEN = 64
LM_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
EXPECTED_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "exit_gate.safetensors",
    "exit_gate_config.json",
    "vtw_calibration.json",
    "vtw_config.json",
}


def fresh_base(seed: int = 0, num_layers: int = NUM_LAYERS):
    return tiny_model("llava", num_layers=num_layers, seed=seed)


def lora_model(base, targets=LM_TARGETS):
    for param in base.parameters():
        param.requires_grad_(False)
    config = LoraConfig(target_modules=targets, r=4, init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    attach(model)
    return model


def random_gate(seed: int = 0) -> ExitGate:
    """Random weights large enough that the gate fires for some samples and not for others."""
    gate = ExitGate(GateConfig(hidden_size=HIDDEN, num_layers=NUM_LAYERS, width=16, min_layer=1, tau=0.5))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gate.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return gate.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 'trained' gated model (random LoRA, random gate, real calibration) and its export."""
    torch.manual_seed(0)
    model = lora_model(fresh_base())
    batch = tiny_inputs(model.get_base_model(), batch_size=4, seed=3)
    # A loose eta so that K < L and the fixed policy really withdraws.
    record = calibrate(model, [batch], CalibrationConfig(num_samples=4, threshold=0.2))
    assert 0 < record.exit_layer < NUM_LAYERS
    gate = random_gate()
    out = export_gated_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "gated", model, gate, record, base_model_name_or_path="tiny-llava"
    )
    return {"model": model, "gate": gate, "record": record, "batch": batch, "dir": out}


def reference(trained, policy: str):
    """Logits, exit layers and greedy tokens of the original in-memory model under ``policy``."""
    model = trained["model"]
    controller = attach(model)
    controller.reduction = policy_reduction(policy, trained["gate"], trained["record"].exit_layer)
    controller.last_exit_layers = None
    with torch.no_grad():
        logits = model(**trained["batch"]).logits
    exits = controller.last_exit_layers
    tokens = model.generate(**trained["batch"], max_new_tokens=4, do_sample=False)
    return logits, exits, tokens


def load(trained, **kw) -> GatedVLM:
    return GatedVLM.from_pretrained(trained["dir"], base_model=fresh_base(), **kw)


def copy_of(trained, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained["dir"], target)
    return target


def rehash(directory: Path) -> None:
    """Re-sign the manifest after a deliberate edit, to reach the checks behind the sha256 one."""
    manifest = json.loads((directory / "vtw_config.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "vtw_config.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("policy", ["gate", "fixed", "gate_capped"])
def test_round_trip_is_bit_exact(trained, policy):
    logits, exits, tokens = reference(trained, policy)
    vlm = load(trained, policy=policy)
    with torch.no_grad():
        loaded_logits = vlm.forward(**trained["batch"]).logits
    assert torch.equal(loaded_logits, logits)
    assert torch.equal(vlm.last_exit_layers, exits)
    assert torch.equal(vlm.generate(**trained["batch"], max_new_tokens=4, do_sample=False), tokens)
    k = trained["record"].exit_layer
    if policy == "fixed":
        assert exits.tolist() == [k] * 4
    elif policy == "gate":
        # The gate must really decide, differently per sample, or equality proves little.
        assert len(set(exits.tolist())) > 1
    else:
        assert int(exits.max()) <= k


def test_call_delegates_like_forward(trained):
    vlm = load(trained)
    with torch.no_grad():
        assert torch.equal(vlm(**trained["batch"]).logits, vlm.forward(**trained["batch"]).logits)


def test_adapter_changes_the_logits(trained):
    vlm = load(trained, policy="fixed")
    with torch.no_grad():
        adapted = vlm(**trained["batch"]).logits
        with vlm.model.disable_adapter():
            plain = vlm(**trained["batch"]).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_set_policy_switches_at_run_time(trained):
    _, gate_exits, _ = reference(trained, "gate")
    vlm = load(trained, policy="fixed")
    k = trained["record"].exit_layer
    with torch.no_grad():
        vlm(**trained["batch"])
        assert vlm.last_exit_layers.tolist() == [k] * 4
        vlm.set_policy("gate")
        vlm(**trained["batch"])
        assert torch.equal(vlm.last_exit_layers, gate_exits)
    vlm.set_policy("gate", tau=0.75)
    assert vlm.gate.config.tau == 0.75 and vlm.policy == "gate"
    with pytest.raises(ValueError, match="policy"):
        vlm.set_policy("sometimes")
    with pytest.raises(ValueError, match="tau"):
        vlm.set_policy("gate", tau=1.5)


def test_loaded_parts_are_exposed(trained):
    vlm = load(trained)
    assert isinstance(vlm.model, PeftModel)
    assert vlm.processor is None  # a module was given as base
    assert vlm.controller is attach(vlm.model)
    assert vlm.calibration.exit_layer == trained["record"].exit_layer
    assert vlm.manifest["format"] == FORMAT
    assert not vlm.gate.training and vlm.gate.config == trained["gate"].config
    assert not any(p.requires_grad for p in vlm.model.parameters())


def test_dtype_cast_after_the_fingerprint_check(trained):
    vlm = load(trained, dtype="bfloat16", policy="fixed")
    assert vlm.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        vlm(**trained["batch"])
    assert vlm.last_exit_layers.tolist() == [trained["record"].exit_layer] * 4


# ------------------------------------------------------------------------------ layout


def test_directory_layout_and_manifest(trained):
    directory = trained["dir"]
    assert {p.name for p in directory.iterdir()} == EXPECTED_FILES
    assert not (directory / "config.json").exists() and not (directory / "model.safetensors").exists()
    manifest = json.loads((directory / "vtw_config.json").read_text())
    assert manifest["format"] == FORMAT
    assert set(manifest["files"]) == EXPECTED_FILES - {"README.md", "vtw_config.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
    assert manifest["base_model"] == "tiny-llava"
    assert manifest["base_model_fingerprint"] == model_fingerprint(fresh_base())
    assert manifest["num_layers"] == NUM_LAYERS
    assert manifest["image_token_id"] == IMAGE_TOKEN_ID
    assert manifest["fallback_exit_layer"] == trained["record"].exit_layer
    assert manifest["policy"] == "gate"
    assert manifest["model_class"] == "LlavaForConditionalGeneration"
    assert {"vtw-train", "torch", "transformers", "peft"} <= set(manifest["versions"])
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-llava"
    card = (directory / "README.md").read_text()
    assert f"K: {trained['record'].exit_layer} of {NUM_LAYERS}" in card and "tau = 0.5" in card


def test_saved_adapter_touches_only_the_language_model(trained):
    keys = list(load_file(str(trained["dir"] / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    assert all(".language_model.layers." in k for k in keys)
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in keys)


def test_plain_peft_still_loads_the_adapter(trained):
    model = PeftModel.from_pretrained(fresh_base(), str(trained["dir"]))
    assert lora_outside_language_model(model, attach(model).language_model) == []


def test_export_refuses_lora_on_the_vision_tower(tmp_path):
    model = lora_model(fresh_base(), targets=["q_proj", "v_proj"])  # also matches CLIP (LLaVA#1380)
    with pytest.raises(ValueError, match="outside the language model"):
        export_gated_checkpoint(tmp_path / "out", model, None, None, base_model_name_or_path="x")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_model_without_adapter(tmp_path):
    with pytest.raises(TypeError, match="PeftModel"):
        export_gated_checkpoint(tmp_path / "out", fresh_base(), None, None, base_model_name_or_path="x")


def test_non_empty_target_needs_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = (trained["model"], trained["gate"], trained["record"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gated_checkpoint(out, *args, base_model_name_or_path="tiny-llava")
    assert (out / "keep.txt").read_text() == "precious"
    export_gated_checkpoint(out, *args, base_model_name_or_path="tiny-llava", overwrite=True)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old dirs left behind
    verify_checkpoint(out)


def test_empty_target_dir_is_used(trained, tmp_path):
    (tmp_path / "out").mkdir()
    export_gated_checkpoint(tmp_path / "out", trained["model"], None, None, base_model_name_or_path="t")
    assert (tmp_path / "out" / "vtw_config.json").is_file()


def test_a_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    import vtw_train.checkpoint.export as checkpoint

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_write_gate", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gated_checkpoint(
            tmp_path / "out", trained["model"], trained["gate"], None, base_model_name_or_path="t"
        )
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_without_gate_runs_the_calibrated_k(trained, tmp_path):
    out = export_gated_checkpoint(
        tmp_path / "k_only", trained["model"], None, trained["record"], base_model_name_or_path="t"
    )
    assert not (out / "exit_gate.safetensors").exists()
    vlm = GatedVLM.from_pretrained(out, base_model=fresh_base())
    assert vlm.policy == "fixed" and vlm.gate is None
    _, exits, _ = reference(trained, "fixed")
    with torch.no_grad():
        vlm(**trained["batch"])
    assert torch.equal(vlm.last_exit_layers, exits)
    with pytest.raises(ValueError, match="no exit gate|needs an exit gate"):
        vlm.set_policy("gate")


# ------------------------------------------------------------------------------ bad directories


def test_corrupt_adapter_is_named(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt.*sha256"):
        GatedVLM.from_pretrained(directory, base_model=fresh_base())


def test_missing_gate_file_is_named(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    (directory / "exit_gate.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"exit_gate\.safetensors is missing"):
        GatedVLM.from_pretrained(directory, base_model=fresh_base())


def test_missing_manifest(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    (directory / "vtw_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vtw_config\.json is missing"):
        GatedVLM.from_pretrained(directory, base_model=fresh_base())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GatedVLM.from_pretrained(tmp_path / "nowhere", base_model=fresh_base())


def test_wrong_format(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    manifest = json.loads((directory / "vtw_config.json").read_text())
    manifest["format"] = "vtw-gated/99"
    (directory / "vtw_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="vtw-gated/99"):
        GatedVLM.from_pretrained(directory, base_model=fresh_base())


def test_wrong_base_weights(trained):
    with pytest.raises(ValueError, match="trained on base tiny-llava .*fingerprint"):
        GatedVLM.from_pretrained(trained["dir"], base_model=fresh_base(seed=1))


def test_wrong_base_depth(trained):
    with pytest.raises(ValueError, match="4-layer decoder.*has 5 layers"):
        GatedVLM.from_pretrained(trained["dir"], base_model=fresh_base(num_layers=5))


def test_base_in_another_dtype_gets_a_hint(trained):
    with pytest.raises(ValueError, match="trained in float32"):
        GatedVLM.from_pretrained(trained["dir"], base_model=fresh_base().to(torch.bfloat16))


def test_missing_base_path_names_the_fix(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="base_model"):
        GatedVLM.from_pretrained(trained["dir"], base_model=str(tmp_path / "no_model"))


def test_gate_weights_must_fit_the_gate_config(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    config = json.loads((directory / "exit_gate_config.json").read_text())
    config["width"] = 8
    (directory / "exit_gate_config.json").write_text(json.dumps(config))
    rehash(directory)
    with pytest.raises(ValueError, match=r"exit_gate\.safetensors does not fit"):
        GatedVLM.from_pretrained(directory, base_model=fresh_base())


def test_top_level_model_files_are_rejected(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    (directory / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json should not be"):
        verify_checkpoint(directory)


# ------------------------------------------------------------------------------ infer CLI


@pytest.fixture(scope="module")
def miniature_checkpoint(tmp_path_factory):
    """A processor-bearing miniature toy base on disk, and a gated checkpoint that points at it."""
    from PIL import Image

    from vtw_train.cli.infer import build_prompt
    from vtw_train.toy.build import build_model, build_processor, miniature_arch

    root = tmp_path_factory.mktemp("mini")
    arch = replace(miniature_arch(), text_layers=4)
    processor = build_processor(arch)
    base = build_model(arch, processor.tokenizer, seed=0)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    image = Image.new("RGB", (arch.image_size, arch.image_size), (200, 30, 30))
    image.save(root / "image.png")
    model = lora_model(base.eval())
    batch = build_prompt(processor, image, "what color is the shape?")
    # min_layer=1 with a huge eta forces K = 1, so the fixed policy visibly withdraws.
    record = calibrate(model, [batch], CalibrationConfig(num_samples=1, min_layer=1, threshold=1e9))
    gate = ExitGate(GateConfig(hidden_size=arch.text_hidden, num_layers=4, width=8))
    out = export_gated_checkpoint(
        root / "gated", model, gate, record, base_model_name_or_path=str(root / "base")
    )
    return {"dir": out, "image": root / "image.png", "base": root / "base"}


def test_infer_cli_fixed_policy(miniature_checkpoint, capsys):
    from vtw_train.cli.infer import main

    args = ["--checkpoint", str(miniature_checkpoint["dir"]), "--image", str(miniature_checkpoint["image"])]
    result = main(
        [*args, "--question", "what color is the shape?", "--policy", "fixed", "--max_new_tokens", "3"]
    )
    printed = capsys.readouterr().out
    assert result.exit_layer == 1 and result.num_layers == 4
    assert "withdrawn after 1 of 4 decoder layers (K = 1)" in printed and "policy fixed" in printed
    assert result.counts.n_visual == 64 and result.counts.n_text > 0
    assert 0 < result.flops.saved_fraction < 1 and "% saved" in printed
    assert printed.startswith("answer:")


def test_infer_cli_gate_policy_with_explicit_base(miniature_checkpoint, capsys):
    from vtw_train.cli.infer import main

    result = main(
        [
            "--checkpoint",
            str(miniature_checkpoint["dir"]),
            "--image",
            str(miniature_checkpoint["image"]),
            "--question",
            "what shape?",
            "--base_model",
            str(miniature_checkpoint["base"]),
            "--max_new_tokens",
            "2",
        ]
    )
    assert 1 <= result.exit_layer <= 4
    assert "policy gate" in capsys.readouterr().out


def test_infer_cli_reports_a_bad_checkpoint(tmp_path, miniature_checkpoint):
    from vtw_train.cli.infer import main

    with pytest.raises(SystemExit, match="vtw_config.json is missing"):
        main(
            ["--checkpoint", str(tmp_path), "--image", str(miniature_checkpoint["image"]), "--question", "q"]
        )


def test_flops_helpers():
    from vtw_train.cli.infer import exit_layer_taken, flops_saving, prompt_counts

    model = fresh_base()
    inputs = tiny_inputs(model, batch_size=1, seed=5)
    counts = prompt_counts(inputs, [IMAGE_TOKEN_ID])
    assert counts.n_visual == 16 and counts.n_text + counts.n_visual == inputs["input_ids"].shape[1]
    assert flops_saving(model.config, counts, NUM_LAYERS).saved_fraction == 0.0
    early, late = (flops_saving(model.config, counts, k).saved_fraction for k in (1, 3))
    assert early > late > 0
    assert exit_layer_taken(None, NUM_LAYERS) == NUM_LAYERS
    assert exit_layer_taken(torch.tensor([2]), NUM_LAYERS) == 2


def test_the_folder_is_shared_like_any_other_and_its_card_names_it(trained):
    """Written through a private temporary folder, the checkpoint still gets the umask's permissions."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    directory = trained["dir"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    card = (directory / "README.md").read_text()
    assert "THIS_DIR" not in card
    assert f'GatedVLM.from_pretrained("{directory}")' in card and f"--checkpoint {directory}" in card


def test_the_processor_handed_out_pads_left_and_right_padding_is_refused(miniature_checkpoint):
    from PIL import Image

    vlm = GatedVLM.from_pretrained(miniature_checkpoint["dir"])
    image = Image.open(miniature_checkpoint["image"])
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        for q in ("what color ?", "what shape is it ?")
    ]
    prompts = [
        vlm.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages
    ]
    batch = vlm.processor(images=[image, image], text=prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1, "pads on the left"
    vlm.generate(**batch, max_new_tokens=2)
    right = dict(batch)
    right["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
        vlm.generate(**right, max_new_tokens=2)


@pytest.mark.parametrize(
    ("image", "question", "message"),
    [
        ("truncated", "what color ?", r"--image .*truncated\.png: cannot read it as an image"),
        ("folder", "what color ?", r"--image .* is a folder; pass an image file"),
        ("missing", "what color ?", r"--image .*missing\.png: no such file"),
        ("ok", "   ", r"--question is empty"),
        ("ok", "what color is <image> ?", r"--question contains the image placeholder <image>"),
    ],
)
def test_infer_refuses_bad_input_naming_it(miniature_checkpoint, tmp_path, image, question, message):
    from vtw_train.cli.infer import main

    good = miniature_checkpoint["image"]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    paths = {"ok": good, "truncated": truncated, "folder": tmp_path, "missing": tmp_path / "missing.png"}
    args = ["--checkpoint", str(miniature_checkpoint["dir"]), "--image", str(paths[image])]
    with pytest.raises(SystemExit, match=message):
        main([*args, "--question", question, "--max_new_tokens", "2"])


def test_infer_warns_about_words_the_model_does_not_know(miniature_checkpoint, capsys):
    from vtw_train.cli.infer import main

    args = ["--checkpoint", str(miniature_checkpoint["dir"]), "--image", str(miniature_checkpoint["image"])]
    main([*args, "--question", "what colour is the zorblax ?", "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert "'colour'" in err and "'zorblax'" in err and "<unk>" in err


def test_a_hub_base_model_not_in_the_cache_fails_at_once_naming_the_manifest(tmp_path):
    import time

    model = lora_model(fresh_base())
    out = export_gated_checkpoint(
        tmp_path / "hub", model, None, None, base_model_name_or_path="nobody/not-a-model"
    )
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match=r"'nobody/not-a-model' is named by .*vtw_config\.json.*base_model="
    ):
        GatedVLM.from_pretrained(out)
    assert time.perf_counter() - start < 10, "no network retries"
