"""The README's Python examples run as written (on a smaller guest)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {"print": lambda *a, **k: None}
    for block in blocks:
        # The examples share names, like a session; a 4G guest keeps it quick.
        exec(compile(block.replace('"64G"', '"4G"'), str(README), "exec"), namespace)
    vm = namespace["vm"]
    assert vm.stats.gmem_closed == 1 and vm.stats.gmem_holes_punched == 1  # type: ignore[attr-defined]
