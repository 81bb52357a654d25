"""The pages' generators: docs/results.py, the tables it assembles (docs/tables/) and the
figures quoted in the prose (docs/figures.py, docs/prose/)."""
