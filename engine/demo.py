"""The embedded demo: a long natural-text document with facts, and a question about it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


@dataclass(frozen=True, slots=True)
class DemoPrompt:
    document: str
    question: str
    answer: str  # the expected answer, for checking
    stop: tuple[str, ...] = ()  # where the answer ends

    @property
    def prompt(self) -> str:
        return self.document + self.question


# The demo of each named model that has its own (others get the embedded model's).
DEMOS = {"smollm2": "demo_smollm2.json"}


def demo_prompt(model: str = "tiny") -> DemoPrompt:
    """The embedded document and question for ``model`` (a named model's own, else the embedded
    default model's)."""
    spec = DEMO_DIR / DEMOS.get(model, "demo.json")
    if not spec.exists():
        raise FileNotFoundError("this build has no embedded demo document yet: give a prompt or --prompt-file")
    meta = json.loads(spec.read_text())
    return DemoPrompt((DEMO_DIR / meta["document"]).read_text(), meta["question"], meta["answer"], tuple(meta.get("stop", ())))
