"""The ``evaluate:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate:`` comparing the pretrained and the SFT model."""

    batch_size: int = spec(16, ge=1)
    max_rows: int | None = spec(None, ge=1, doc="cap on validation rows for loss / bpb")
    context_factors: list[int] = spec(default_factory=lambda: [1, 2, 4],
                                      doc="bpb at these multiples of the training context")
    max_task_examples: int = spec(250, ge=1, doc="held-out conversations per task")
    max_new_tokens: int = spec(96, ge=1)
    choices: int = spec(4, ge=2, doc="answers per multiple-choice doc question")
    contamination_ngram: int = spec(13, ge=8, le=50, doc="words in a run shared with a "
                                    "training stream that marks an example contaminated (the "
                                    "check always runs)")
    models: list[str] = spec(default_factory=lambda: ["pretrain", "sft", "dpo", "rl"],
                             doc="the models of the chain to score, in chain order, the last "
                                 "one also on val (a quick comparison that skips alignment "
                                 "scores pretrain and sft only); each one a model the "
                                 "evaluate stage depends on in dvc.yaml")
    prompts: list[str] = spec(default_factory=lambda: [
        "What is 12 + 7?",
        "Spell the word 'python'.",
        "Reverse the letters of the word 'stack'.",
        "What is 17 + 21?",
        "Spell the word 'concrete'.",
        "Reverse the letters of the word 'absent'.",
        "What does `subprocess.Popen.poll` do?",
        "What is the Python `statistics` module for?",
    ], doc="prompts every model answers in reports/samples.md, each shown with the split its "
           "word, operands or document fall in (the defaults: the README's three questions, "
           "then test words of several tokens, a test pair and test documents)")

    def validate(self) -> list[str]:
        if not self.models or len(set(self.models)) != len(self.models):
            return [f"evaluate.models must be a non-empty list of distinct model names "
                    f"(got {self.models})"]
        if 1 not in self.context_factors or any(f < 1 for f in self.context_factors):
            return [f"evaluate.context_factors must be integers >= 1 and include 1 (the "
                    f"training context) (got {self.context_factors})"]
        return []
