"""The README's configuration examples are configurations zkgate accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from dispatcher.config import parse_config

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_configuration_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.splitlines()[0])
def test_each_readme_example_parses(example: str) -> None:
    config = parse_config(tomllib.loads(example))
    # Each scenario brings registries in: upstreams, or an ensemble to mirror.
    assert config.upstreams or config.mirrors
