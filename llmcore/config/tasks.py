"""The synthetic tasks with checkable answers (made by :mod:`llmcore.data.tasks`): the
names the ``fetch:`` and ``rl:`` sections use for them."""

SYNTHETIC_TASKS = ("arithmetic", "spell", "count", "reverse")
