"""The ``flow:`` section: the Prefect flow's scheduling (read by the flow; no stage depends
on it)."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.schema import spec


@dataclass(frozen=True)
class FlowTimeouts:
    """``flow.timeouts:`` seconds a stage may run under the Prefect flow before it is killed;
    a stage without a field of its own (one just added to dvc.yaml) gets ``default``."""

    default: float = spec(3600.0, gt=0)
    fetch: float = spec(1800.0, gt=0)
    tokenizer: float = spec(1800.0, gt=0)
    pack: float = spec(3600.0, gt=0)
    pretrain: float = spec(86400.0, gt=0)
    sft: float = spec(86400.0, gt=0)
    dpo: float = spec(14400.0, gt=0)
    rl: float = spec(14400.0, gt=0)
    evaluate: float = spec(7200.0, gt=0)
    quantize: float = spec(3600.0, gt=0)


@dataclass(frozen=True)
class FlowConfig:
    """``flow:`` the Prefect flow's scheduling (read by pipeline/flow.py; no stage depends on it)."""

    retries: int = spec(1, ge=0, doc="retries of a stage that failed for another reason than "
                                     "bad input (a stage's bad-input exit is never retried)")
    retry_delay: float = spec(10.0, ge=0, doc="seconds between tries")
    timeouts: FlowTimeouts = spec(default_factory=FlowTimeouts)

    def timeout(self, stage: str) -> float:
        """Seconds ``stage`` may run: its own timeout, or the default one."""
        return float(getattr(self.timeouts, stage, self.timeouts.default))
