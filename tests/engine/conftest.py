"""What the built-in model's engine tests share: the shipped examples, their preamble, and the model."""

from pathlib import Path

import pytest

from hoppatch.engine.models import BUILTIN_GEMMA, load_model
from hoppatch.spec import read_examples, read_preamble

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = read_examples(ROOT / "examples" / "gemma-3-270m.json")
PREAMBLE = read_preamble(ROOT / "examples" / "preamble.txt")


@pytest.fixture(scope="module")
def gemma():
    """The built-in model on the CPU, loaded once per test module."""
    return load_model(BUILTIN_GEMMA, device="cpu")
