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

    @property
    def prompt(self) -> str:
        return self.document + self.question


def demo_prompt() -> DemoPrompt:
    """The embedded document and question (shipped with the embedded default model)."""
    spec = DEMO_DIR / "demo.json"
    if not spec.exists():
        raise FileNotFoundError("this build has no embedded demo document yet: give a prompt or --prompt-file")
    meta = json.loads(spec.read_text())
    return DemoPrompt((DEMO_DIR / meta["document"]).read_text(), meta["question"], meta["answer"])
