"""The team deployment's pull step: check out the commit a flow run names before its flow's
code is imported, so that the orchestration code runs at that commit too, not only the stages.

Prefect runs a deployment's pull steps in the flow run's process, in the worker's checkout
(``set_working_directory`` first), and only then imports the entrypoint. A pull step sees
environment variables, not the run's parameters, so this one reads them from the API
(``PREFECT__FLOW_RUN_ID`` is set by the worker). Standard library and Prefect only: this module
is imported from the checkout as it was before the checkout.
"""

from __future__ import annotations

import os
import subprocess
from uuid import UUID

REMOTE = "team"  # pipeline.team.settings.REMOTE (not imported: see above)


def checkout_commit() -> dict[str, str]:
    """``git fetch team`` then ``git checkout --force --detach <commit>`` in the current folder."""
    from prefect.client.orchestration import get_client

    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        raise RuntimeError("PREFECT__FLOW_RUN_ID is not set: this step runs in a flow run")
    with get_client(sync_client=True) as client:
        commit = str(client.read_flow_run(UUID(run_id)).parameters.get("commit") or "")
    if not commit:
        raise RuntimeError("the run names no commit (parameter 'commit')")
    subprocess.run(["git", "fetch", "--quiet", REMOTE], capture_output=True, timeout=300)
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise RuntimeError(f"commit {commit!r} is not on the team's git remote: push it "
                           f"(`git push {REMOTE} HEAD`) and run again")
    done = subprocess.run(["git", "checkout", "--quiet", "--force", "--detach",
                           found.stdout.strip()], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git checkout {commit}: {done.stderr.strip()[-300:]}")
    return {"commit": found.stdout.strip(), "directory": os.getcwd()}
