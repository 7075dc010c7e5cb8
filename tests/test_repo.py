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


#: configs/<folder>/ -> the typed config its files are read into. configs/*.yaml are the main job's
#: (LightningCLI); configs/strategies/ holds fragments composed with configs/tiny.yaml. A new folder
#: must be added here, so no shipped config goes unparsed.
FOLDER_CONFIGS = {
    "evaluate": "vtw_train.cli.evaluate:EvaluateRun",
    "calibrate": "vtw_train.cli.calibrate:CalibrateRun",
    "benchmark": "vtw_train.cli.benchmark:BenchmarkRun",
    "toy": "vtw_train.toy.config:ToyBuildConfig",
}


def _config_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def parse_train_config(*paths: Path):
    """Parse (and type-check, and resolve links) without instantiating anything: no model loads."""
    from vtw_train.cli.train import GateCLI
    from vtw_train.data.datamodule import VLMDataModule
    from vtw_train.training.module import GateDistillModule

    class ParseOnly(GateCLI):
        def instantiate_classes(self) -> None:
            pass

    args = [arg for path in paths for arg in ("--config", str(path))]
    return ParseOnly(GateDistillModule, VLMDataModule, run=False, args=args).config


ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses(path: Path):
    folder = path.parent.relative_to(ROOT / "configs").as_posix()
    if folder == ".":
        config = parse_train_config(path)
        assert config.model.model_path and config.data.train_path
        return
    if folder == "strategies":
        config = parse_train_config(ROOT / "configs" / "tiny.yaml", path)
        assert config.trainer.strategy is not None
        return
    spec = FOLDER_CONFIGS.get(folder)
    if spec is None:
        pytest.fail(f"configs/{folder}/ has no parser registered in tests/test_repo.py (FOLDER_CONFIGS)")
    from vtw_train.config import parse_config

    cls = _config_class(spec)
    parsed = parse_config(cls, ["--config", str(path)], "test", "")
    assert isinstance(parsed, cls)


def test_every_command_has_a_script_shim_and_a_config_folder_or_none():
    """``vtw-train <command>`` and ``scripts/`` stay in step: every command has its shim."""
    from vtw_train.cli.main import COMMANDS

    shims = {
        re.search(r'run_command\("([\w-]+)"', p.read_text()).group(1) for p in (ROOT / "scripts").glob("*.py")
    }
    assert shims == set(COMMANDS)


def test_train_config_typo_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "llava15_7b.yaml").read_text().replace("lora_alpha", "lora_alfa"))
    with pytest.raises(SystemExit):
        parse_train_config(bad)


def test_config_typo_names_the_key(tmp_path, capsys):
    from vtw_train.cli.calibrate import CalibrateRun
    from vtw_train.config import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("calibration:\n  treshold: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(CalibrateRun, ["--config", str(bad)], "calibrate.py", "")
    assert "treshold" in capsys.readouterr().err


CITING = ("vtw_train", "tests", "scripts", "configs")


def _citations() -> list[tuple[str, str, str]]:
    """``(file, cited doc, anchor)`` for every ``docs/<name>.md §N`` / ``docs/<name>.md, trap N`` in the code."""
    pattern = re.compile(r"docs/([\w]+)\.md(?:(?:,? §|\s§)([\d.]+\d)|, trap (\d+))?")
    out = []
    for folder in CITING:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml") or not path.is_file():
                continue
            for match in pattern.finditer(path.read_text()):
                anchor = (
                    match.group(2) and f"§{match.group(2)}" or match.group(3) and f"trap {match.group(3)}"
                )
                out.append((str(path.relative_to(ROOT)), match.group(1), anchor or ""))
    return out


def test_code_cites_only_documents_in_the_repository():
    citations = _citations()
    assert citations, "expected the code to cite docs/"
    for where, doc, anchor in citations:
        path = ROOT / "docs" / f"{doc}.md"
        assert path.is_file(), f"{where} cites docs/{doc}.md, which does not exist"
        text = path.read_text()
        if anchor.startswith("§"):
            number = anchor[1:]
            assert re.search(rf"^#+ {re.escape(number)}\.? ", text, re.M), (
                f"{where}: docs/{doc}.md has no {anchor}"
            )
        elif anchor.startswith("trap"):
            number = anchor.split()[1]
            traps = text.split("## Traps", 1)[-1]
            assert re.search(rf"^{number}\. ", traps, re.M), f"{where}: docs/{doc}.md has no {anchor}"
    for folder in CITING:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for internal in ("METHODS" + ".md", "ENGINE" + "_NOTES", "GPU" + "_NOTES"):
                assert internal not in text, (
                    f"{path.relative_to(ROOT)} cites {internal}, which users do not have"
                )


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against the package)."""
    import ast

    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_engine_imports_no_method_and_nothing_above_it():
    """Methods plug into the engine through its protocols; the engine never imports them (or any later stage)."""
    above = ("vtw_train.methods", "vtw_train.calibration", "vtw_train.gate", "vtw_train.training",
             "vtw_train.evaluation", "vtw_train.checkpoint", "vtw_train.cli", "vtw_train.toy")  # fmt: skip
    for path in (ROOT / "vtw_train" / "engine").rglob("*.py"):
        bad = sorted(m for m in _imports(path) if m.startswith(above))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_import_cycles_between_package_modules():
    modules = {}
    for path in (ROOT / "vtw_train").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }

    def reach(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reach(name) and not name.endswith("__main__"))
    assert not cycles, f"modules on an import cycle: {cycles}"
