"""What README.md and docs/demo.md say about the demo checkpoint holds: the README's example question is answered
as printed, and the demo's vision tower is found from any working directory without --vision-tower."""

from __future__ import annotations

import re
import subprocess
import sys

from llava.utils import checkpoint_config, resolved_tower
from tests.helpers import REPO

DEMO = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"


def readme_demo_command() -> tuple[str, str]:
    """(the README's run_llava command for the demo checkpoint, the answer its comment promises)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(
        r"^(python -m llava\.eval\.run_llava --model-path playground/checkpoints/llava-v1\.5-demo .*?)"
        r"\s+# prints: (\S+)$",
        text,
        re.MULTILINE | re.DOTALL,
    )
    assert match, "README.md: no run_llava example for the demo checkpoint ending in '# prints: <answer>'"
    return match.group(1), match.group(2)


def test_readme_demo_query_is_answered_as_printed():
    command, expected = readme_demo_command()
    command = command.replace("python ", f"{sys.executable} ", 1)
    done = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


def test_demo_tower_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = checkpoint_config(str(DEMO))
    assert not (tmp_path / config["mm_vision_tower"]).exists()
    tower = resolved_tower(config, str(DEMO))
    assert (REPO / "playground" / "checkpoints" / "llava-v1.5-demo-clip").samefile(tower)
    demo_doc = (REPO / "docs" / "demo.md").read_text(encoding="utf-8")
    assert "from elsewhere need `--vision-tower`" not in demo_doc
