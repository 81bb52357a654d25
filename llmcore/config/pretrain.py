"""The ``pretrain:`` section: the training loop's settings (:class:`TrainConfig`) as pretraining
uses them, with nothing added. Its own module so that every section of params.yaml is the
module of the same name (how :func:`llmcore.config.base.section_names` finds them)."""

from __future__ import annotations

from dataclasses import dataclass

from llmcore.config.train import TrainConfig


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """``pretrain:`` next-token prediction on the document shards."""
