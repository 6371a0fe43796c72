import re
import tomllib

import yaml

from tests.conftest import ROOT


def _names(reqs):
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert set(pip) - {"-e ."} == wanted
    assert "-e ." in pip


def test_no_evaluate_library_and_no_remote_code():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "evaluate" not in _names(project["dependencies"])
    for path in list((ROOT / "hb_utils").glob("*.py")) + list((ROOT / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert not re.search(r"(^|\n)\s*(import evaluate|from evaluate import)|evaluate\.load\(", text), path
