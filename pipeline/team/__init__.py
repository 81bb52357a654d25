"""Team mode: the pipeline across several hosts, on servers a team already runs.

The embedded default (``make pipeline``: SQLite MLflow store and Prefect server inside the
checkout, a local DVC cache) stays what one person uses. A team instead runs, on one *hub*:
PostgreSQL (the backend store of both servers), ``mlflow server`` with served artifacts and its
basic-auth app, ``prefect server`` with an auth string, and an SSH server that holds the team's
bare git repository and DVC remote. Training hosts run ``prefect worker start`` on the process
work pool ``llmcore``; every checkout points at the hub by configuration only (docs/teams.md).

    python -m pipeline.team up --host 10.0.0.1      # the hub (make team-up HOST=...)
    python -m pipeline.team worker --checkout DIR    # a training host (make team-worker)
    python -m pipeline.team connect                  # point this checkout at the hub
    python -m pipeline.team run --set pretrain.lr=0.001   # a run on whichever worker is free
    python -m pipeline.team down                     # stop the hub (its data is kept)

Modules: ``settings`` (ports, paths, secrets, the client environment), ``services`` (one
process per server: start, wait until it answers, stop), ``stack`` (the hub up and down, the
Prefect objects), ``flow`` (what a worker runs), ``client`` (a checkout pointed at the hub).
"""
