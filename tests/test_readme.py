"""The README's two commands are what a new user runs: CI must run the same test command, and both must exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme_blocks = bash_blocks((REPO / "README.md").read_text())
    test_command = readme_blocks[1]
    assert "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readme_main_command_trains_the_shipped_config() -> None:
    main_command = bash_blocks((REPO / "README.md").read_text())[0]
    assert main_command.endswith("python -m lit_td3 fit --config configs/td3.yaml")
    assert (REPO / "configs" / "td3.yaml").is_file()
