"""Installed as users install it: a non-editable `pip install .` into another folder, used from
another working directory, next to the `recipe` namespace package of verl's stack.

The project is copied (so the build leaves nothing in the checkout) and installed with
`pip install --no-deps --no-build-isolation --target <tmp>`; a subprocess then imports it from
<tmp> only (the venv's editable-install finder, which maps verl_ext and recipe to a checkout, is
removed from sys.meta_path) and checks:
- `recipe.dapo_reweight.main` imports from the installed copy, and `recipe` is a namespace
  package: TransferQueue (a dependency of verl 0.9.1) installs `recipe/simple_use_case`, which
  stays importable next to ours;
- `verl_ext.core.paths.config_dir()` is the installed package data, holding every config of
  `COMMAND_CONFIGS` and the presets;
- every command composes its config from there: `python -m <command> --cfg job` (hydra prints the
  composed config and runs nothing), as the scripts call it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from verl_ext.core.paths import COMMAND_CONFIGS

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("setup.py", "pyproject.toml", "README.md", "recipe", "verl_ext", "configs")

# Runs in the subprocess: python -c PROBE <target>. Prints one JSON line.
PROBE = r"""
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import recipe
import recipe.dapo_reweight.main as main
import verl_ext
from verl_ext.core.paths import COMMAND_CONFIGS, config_dir, available_presets
other = importlib.util.find_spec("recipe.simple_use_case")
demo = importlib.util.find_spec("recipe.simple_use_case.relax_demo") if other else None
print(json.dumps({
    "recipe_path": list(recipe.__path__),
    "recipe_file": getattr(recipe, "__file__", None),
    "main": main.__file__,
    "verl_ext": verl_ext.__file__,
    "config_dir": str(config_dir()),
    "configs": sorted(p.name for p in config_dir().glob("*.yaml")),
    "presets": available_presets(),
    "other_recipe": list(other.submodule_search_locations) if other else None,
    "other_module": demo.origin if demo else None,
    "verl": importlib.util.find_spec("verl") is not None,
}))
"""
# A command run the way its script runs it, without the editable finder: python -c RUN_COMMAND <module> <args...>
RUN_COMMAND = r"""
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src, target, cwd = tmp / "src", tmp / "target", tmp / "elsewhere"
    src.mkdir()
    cwd.mkdir()
    for name in PROJECT_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
           "--disable-pip-version-check", "-q", "--target", str(target), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False, cwd=cwd)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(target)
    return target, cwd, env


def test_installed_copy_imports_and_finds_its_configs(installed):
    target, cwd, env = installed
    proc = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True, cwd=cwd,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["recipe_file"] is None, f"`recipe` must be a namespace package, got a regular one: {got['recipe_file']}"
    assert str(target / "recipe") in got["recipe_path"]
    assert got["main"].startswith(str(target)), got["main"]
    assert got["verl_ext"].startswith(str(target)), got["verl_ext"]
    assert got["config_dir"] == str(target / "verl_ext" / "configs")
    wanted = {f"{name}.yaml" for names in COMMAND_CONFIGS.values() for name in names}
    assert wanted <= set(got["configs"]), f"not installed: {sorted(wanted - set(got['configs']))}"
    assert {"qwen2.5-math-7b", "qwen3-8b-base", "tiny-cpu"} <= set(got["presets"])
    assert got["verl"], "verl must be importable next to the installed copy"
    if got["other_recipe"] is not None:  # TransferQueue's recipe/simple_use_case, when installed
        assert got["other_module"], "the other `recipe` portion is shadowed"
        assert not got["other_module"].startswith(str(target)), got["other_module"]


@pytest.mark.parametrize("module,config_name", [(m, n) for m, names in COMMAND_CONFIGS.items() for n in names])
def test_every_command_composes_its_installed_config(installed, module, config_name):
    target, cwd, env = installed
    args = ["--config-name", config_name, "--cfg", "job"]
    proc = subprocess.run([sys.executable, "-c", RUN_COMMAND, module, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, check=False)
    assert proc.returncode == 0, f"python -m {module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    composed = yaml.safe_load(proc.stdout)
    own = yaml.safe_load((target / "verl_ext" / "configs" / f"{config_name}.yaml").read_text())
    missing = set(own) - {"defaults", "hydra"} - set(composed)
    assert not missing, f"{module} did not compose {config_name}.yaml: keys {sorted(missing)} missing"
