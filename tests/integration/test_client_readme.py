"""The Python blocks of clients/python/README.md run against a real in-process service (the tiny
C4 model) with the documented target replaced by the test server's."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(
    block: str,
    start_service: Callable[..., Any],
    tiny_model_store: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = start_service(model_store=str(tiny_model_store))
    assert "127.0.0.1:50051" in block, "README examples name the default target"
    exec(compile(block.replace("127.0.0.1:50051", service.target), str(README), "exec"), {})
    assert capsys.readouterr().out
