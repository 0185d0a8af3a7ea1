""".ci/mutation.py writes mutmut's [tool.mutmut] into its scratch copy's pyproject.toml;
with --keep the folder may be configured again, which must replace that table whole."""

import importlib.util
import shutil
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def mutation() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation", ROOT / ".ci" / "mutation.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuring_a_kept_folder_again_replaces_the_mutmut_table_and_nothing_else(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").touch()
    ci = mutation()
    ci.configure(tmp_path, ["app/config.py"], ["tests/test_a.py"], timeout=15.0)
    ci.configure(tmp_path, ["app/db.py"], ["tests/test_a.py"], timeout=3.0)

    settings = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    table = settings["tool"].pop("mutmut")
    assert table["only_mutate"] == ["app/db.py"] and table["timeout_multiplier"] == 3.0
    assert table["pytest_add_cli_args_test_selection"] == ["tests/test_a.py"]
    assert settings == tomllib.loads((ROOT / "pyproject.toml").read_text())  # no stray table
