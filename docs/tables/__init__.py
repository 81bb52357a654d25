"""The renderers that docs/results.py assembles into docs/results.md and the README's region.

Each function takes the files read (:class:`base.Files`) and returns the lines of one table,
or of a line saying which file is missing and what writes it:

- :mod:`base`: reading the files and formatting their values, shared by every part;
- :mod:`run`: the default run (``metrics/*.json``): the models compared, each stage, times;
- :mod:`seeds`: comparisons over seeds (``reports/compare/*.json``) and the default's own;
- :mod:`bench`: the benchmarks' reports (``reports/*.json``), from throughput to exports;
- :mod:`readme`: the README's region: the comparison, the default over seeds, the samples.

Standard library and PyYAML only (and ``stages.chain``), like docs/results.py, which puts the
repository on ``sys.path`` before importing them.
"""
