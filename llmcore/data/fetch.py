"""The fetch stage's work: read the sources and the preference pairs, clean, split, write.

:mod:`llmcore.data.sources` reads documents and conversations, :mod:`llmcore.data.assemble`
cleans and splits them, :mod:`llmcore.data.preferences` builds on both for preference pairs.
This module
is the one place that joins them into the corpus directory, so neither imports the other's
caller (no import circle).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llmcore.config.fetch import FetchConfig
from llmcore.data.assemble import CorpusStats, collect
from llmcore.data.corpus import write_corpus
from llmcore.data.preferences import collect_preferences, read_preferences_file
from llmcore.data.sources import ROW_SUFFIXES, expand_paths, source_records


def build_corpus(cfg: FetchConfig, out_dir: Path, root: Path | None = None) -> CorpusStats:
    """Run the whole fetch: read the source and the preference pairs, clean, split, write
    ``out_dir``. Without ``fetch.preference_paths`` no preference table is written."""
    start = time.perf_counter()
    preference_files = expand_paths(cfg.preference_paths, root, "fetch.preference_paths",
                                    ROW_SUFFIXES)  # before any work: a wrong path fails fast
    tables, stats = collect(source_records(cfg, root), cfg)
    if cfg.preference_paths:
        pairs = (rec for path in preference_files for rec in read_preferences_file(path))
        tables.update(collect_preferences(pairs, cfg, stats))
    stats.seconds = time.perf_counter() - start
    info = {
        "source": cfg.source,
        "python_version": sys.version.split()[0] if cfg.source == "builtin" else None,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "bad_examples": stats.bad_examples,
        "sft_tasks": dict(sorted(stats.sft_tasks.items())),
    }
    write_corpus(tables, out_dir, info, stats.bad_listed)
    return stats
