"""The repository's promises: README quickstart, CI, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quickstart bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_two_commands_main_job_and_tests():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "configs/tiny.yaml" in commands[0]
    assert "pytest" in commands[1]
    for command in commands:
        assert "pip install -c constraints.txt" in command


def test_ci_runs_the_readme_test_command():
    test_command = quickstart_commands()[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
    assert any("constraints.txt" in line for line in ci)


def test_constraints_pin_the_tested_stack():
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"] == "5.23.0"
    assert pins["peft"] == "0.21.2"
    assert pins["lightning"] == "2.6.6"


SCRIPT_CONFIGS = {
    "calibrate_tiny.yaml": "vtw_train.cli.calibrate:CalibrateRun",
    "benchmark.yaml": "vtw_train.cli.benchmark:BenchmarkRun",
    "toy_vlm.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_size_curriculum.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_pair_curriculum.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_pair_spatial.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_pair_early.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_v1.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_short_flip.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "toy_vlm_10k.yaml": "vtw_train.toy.config:ToyBuildConfig",
    "evaluate_tiny.yaml": "vtw_train.cli.evaluate:EvaluateRun",
}
#: configs read by scripts/train_gate.py (LightningCLI); strategy fragments are composed with tiny.yaml
TRAIN_CONFIGS = ("tiny.yaml", "llava15_7b.yaml", "llava_next_7b.yaml", "qwen2_vl_2b.yaml")


def _config_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def parse_train_config(*paths: Path):
    """Parse (and type-check, and resolve links) without instantiating anything: no model loads."""
    from vtw_train.cli.train_gate import GateCLI
    from vtw_train.data.datamodule import VLMDataModule
    from vtw_train.lit.module import GateDistillModule

    class ParseOnly(GateCLI):
        def instantiate_classes(self) -> None:
            pass

    args = [arg for path in paths for arg in ("--config", str(path))]
    return ParseOnly(GateDistillModule, VLMDataModule, run=False, args=args).config


ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses(path: Path):
    if path.parent.name == "strategies":
        config = parse_train_config(ROOT / "configs" / "tiny.yaml", path)
        assert config.trainer.strategy is not None
        return
    if path.name in TRAIN_CONFIGS:
        config = parse_train_config(path)
        assert config.model.model_path and config.data.train_path
        return
    spec = SCRIPT_CONFIGS.get(path.name)
    if spec is None:
        pytest.fail(f"configs/{path.name} has no parser registered in tests/test_repo.py")
    from vtw_train.cli.config import parse_config

    cls = _config_class(spec)
    parsed = parse_config(cls, ["--config", str(path)], "test", "")
    assert isinstance(parsed, cls)


def test_train_config_typo_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "llava15_7b.yaml").read_text().replace("lora_alpha", "lora_alfa"))
    with pytest.raises(SystemExit):
        parse_train_config(bad)


def test_config_typo_names_the_key(tmp_path, capsys):
    from vtw_train.cli.calibrate import CalibrateRun
    from vtw_train.cli.config import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("calibration:\n  treshold: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(CalibrateRun, ["--config", str(bad)], "calibrate.py", "")
    assert "treshold" in capsys.readouterr().err
