"""DVC stage ``fetch``: read the configured source into ``data/corpus/`` (Parquet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcore.config.fetch import FetchConfig
from llmcore.data.corpus import BAD_RECORDS_FILE
from llmcore.data.fetch import build_corpus
from llmcore.tracking import Tracker
from stages import paths
from stages._common import StageParams, log, repo_root, run_stage

STAGE = "fetch"
OUT = paths.CORPUS


@dataclass(frozen=True)
class Params(StageParams):
    fetch: FetchConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = p.fetch
    root = repo_root()
    stats = build_corpus(cfg, root / OUT, root=root)
    for example in stats.bad_examples:
        log(f"fetch: malformed record skipped: {example}")
    if stats.bad_records > len(stats.bad_examples):
        log(f"fetch: ... and {stats.bad_records - len(stats.bad_examples)} more malformed "
            f"records, all listed in {OUT}/{BAD_RECORDS_FILE}")
    for note in stats.notes:
        log(f"fetch: warning: {note}")
    metrics = stats.metrics("fetch")
    log(f"fetch: {metrics['fetch/documents']} documents ({metrics['fetch/bytes']} bytes), "
        f"{metrics['fetch/conversations']} conversations, {stats.duplicates_dropped} duplicate "
        f"documents and {stats.bad_records} malformed records dropped")
    if cfg.preference_paths:
        log(f"fetch: {metrics['fetch/preference_pairs']} preference pairs "
            f"({metrics['fetch/preference_pairs_val']} val, "
            f"{metrics['fetch/preference_pairs_test']} test), "
            f"{stats.preference_duplicates_dropped} duplicate pairs dropped")
    return metrics


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
