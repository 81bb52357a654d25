"""DVC stage ``fetch``: read the configured source into ``data/corpus/`` (Parquet)."""

from __future__ import annotations

from llmcore.corpus import build_corpus
from stages._common import log, repo_root, run_stage

OUT = "data/corpus"


def body(cfgs, tracker):
    cfg = cfgs["fetch"]
    root = repo_root()
    stats = build_corpus(cfg, root / OUT, root=root, log=log)
    for example in stats.bad_examples:
        log(f"fetch: malformed record skipped: {example}")
    if stats.bad_records > len(stats.bad_examples):
        log(f"fetch: ... {stats.bad_records - len(stats.bad_examples)} more malformed records")
    metrics = stats.metrics("fetch")
    log(f"fetch: {metrics['fetch/documents']} documents ({metrics['fetch/bytes']} bytes), "
        f"{metrics['fetch/conversations']} conversations, {stats.duplicates_dropped} duplicate "
        f"documents and {stats.bad_records} malformed records dropped")
    return metrics


def main() -> None:
    run_stage("fetch", ["base", "fetch"], body)


if __name__ == "__main__":
    main()
