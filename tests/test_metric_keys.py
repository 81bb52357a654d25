"""The metric names are defined once: what the evaluate stage writes is what the readers ask."""

from llmcore import metric_keys as keys
from llmcore.eval.evaluate import task_metrics


def test_names_round_trip():
    assert keys.context_factor(keys.bpb_at_context(4)) == 4
    assert keys.context_factor(keys.DOCS_BPB) is None
    assert keys.context_factor("bpb_ctxAx") is None
    assert keys.contamination_metric("spell", "examples").startswith(keys.CONTAMINATION)
    assert keys.stage_seconds("sft") == keys.stage_metric("sft", "stage_seconds")


def test_the_judged_figures_are_what_the_evaluation_writes():
    """The figures the default is judged on (and the comparison decides on) are keys that
    :func:`task_metrics` writes for a model with word tasks of one and of several tokens."""
    outcome = {"exact_match": 0.5, "im_end_rate": 1.0, "n": 2, "ci95": (0.1, 0.9),
               "correct": [True, False], "pieces": [1, 3], "replies": ["a", "b"]}
    tasks = {t: dict(outcome) for t in ("arithmetic", "count", "spell", "reverse")}
    tasks["arithmetic"]["pieces"] = [None, None]  # not a word task
    written = task_metrics(keys.VAL, tasks)
    for name in keys.JUDGED:
        assert keys.model_metric(keys.VAL, name) in written, name
    assert keys.model_metric(keys.VAL, keys.exact_match("spell", keys.SINGLE)) in written
    assert keys.model_metric(keys.VAL, keys.exact_match("arithmetic", keys.MULTI)) not in written
