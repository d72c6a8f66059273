"""The README's commands are what CI and users run: keep them well-formed and pointing at code."""

import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```\s*<!-- /{marker} -->", README, re.S)
    assert match, f"README.md has no ```bash block between <!-- {marker} --> markers"
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    # Extract the command the way .ci/run does and compare with an independent regex parse.
    script = (REPO / ".ci" / "run").read_text()
    sed = re.search(r"readme_test_command=\$\((.*?)\)\n", script, re.S).group(1)
    out = subprocess.run(["bash", "-c", sed], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _block("test-command").strip()


def test_main_and_test_commands_are_single_lines_that_install_then_run():
    for marker in ("main-command", "test-command"):
        command = _block(marker)
        assert "\n" not in command
        assert "--no-build-isolation" in command and "torch==" in command


def test_every_python_m_module_in_readme_exists():
    modules = set(re.findall(r"python -m (kdhpc[\w.]*)", README))
    assert modules, "README names no entry point"
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"README names modules that do not exist: {missing}"
