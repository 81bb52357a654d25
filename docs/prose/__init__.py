"""The figures quoted in the prose of the pages, one module per subject; each registers its
figures with :func:`docs.figures.figure` when imported."""
