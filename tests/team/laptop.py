"""What the ``laptop`` host asks the hub, run inside its namespace from its checkout (the
checkout's ``team.env`` gives the addresses and credentials). Prints one JSON object.

    python tests/team/laptop.py state FLOW_RUN_ID
    python tests/team/laptop.py refused            # requests without credentials
    python tests/team/laptop.py runs EXP...        # MLflow runs and model versions of experiments
    python tests/team/laptop.py weights EXP        # dvc pull of EXP's model == its MLflow version
    python tests/team/laptop.py same EXP1 EXP2     # the two experiments' registered weights
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

ROOT = Path.cwd()
MODEL = "llmcore-pretrain"


def load_env() -> None:
    sys.path.insert(0, str(ROOT))
    from pipeline.team.settings import load_team_env

    load_team_env(ROOT)


def http(url: str, method: str = "GET", body: dict | None = None,
         auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def state(run_id: str) -> dict:
    code, text = http(f"{os.environ['PREFECT_API_URL']}/flow_runs/{run_id}",
                      auth=os.environ["PREFECT_API_AUTH_STRING"])
    if code != 200:
        return {"http": code}
    st = json.loads(text).get("state") or {}
    return {"type": st.get("type"), "name": st.get("name"), "message": st.get("message")}


def refused() -> dict:
    mlflow, prefect = os.environ["MLFLOW_TRACKING_URI"], os.environ["PREFECT_API_URL"]
    host = mlflow.split("//")[1].split(":")[0]
    password = os.environ["MLFLOW_TRACKING_PASSWORD"]
    out = {
        "mlflow_no_credentials": http(f"{mlflow}/api/2.0/mlflow/experiments/search"
                                      "?max_results=1")[0],
        "mlflow_wrong_password": http(f"{mlflow}/api/2.0/mlflow/experiments/search"
                                      "?max_results=1", auth="team:wrong")[0],
        "mlflow_ui_no_credentials": http(f"{mlflow}/")[0],
        "mlflow_ui_with_credentials": http(f"{mlflow}/", auth=f"team:{password}")[0],
        "prefect_no_credentials": http(f"{prefect}/flow_runs/filter", "POST", {})[0],
        "prefect_wrong_auth": http(f"{prefect}/flow_runs/filter", "POST", {},
                                   auth="admin:wrong")[0],
        "prefect_with_auth": http(f"{prefect}/flow_runs/filter", "POST", {"limit": 1},
                                  auth=os.environ["PREFECT_API_AUTH_STRING"])[0],
    }
    try:
        socket.create_connection((host, 5432), timeout=3).close()
        out["postgres_from_laptop"] = "open"
    except OSError as exc:
        out["postgres_from_laptop"] = type(exc).__name__
    url = os.environ["LLMCORE_TEAM_GIT"]
    user_host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    ssh = subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o",
                          "IdentitiesOnly=yes", "-o", "IdentityFile=/nonexistent", "-o",
                          "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-p", port, user_host, "true"], capture_output=True, text=True,
                         timeout=30)
    out["ssh_without_key"] = ssh.returncode
    out["ssh_without_key_says"] = ssh.stderr.strip().splitlines()[-1] if ssh.stderr else ""
    return out


def runs(names: list[str]) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    out: dict = {}
    for name in names:
        found = client.search_runs(exps, f"tags.`dvc.exp_name` = '{name}'")
        entry = out[name] = {"runs": [], "versions": []}
        for run in found:
            tags = run.data.tags
            entry["runs"].append({
                "stage": tags.get("llmcore.stage"), "status": run.info.status,
                "host": tags.get("llmcore.host"), "git_commit": tags.get("git_commit"),
                "artifact_uri": run.info.artifact_uri,
                "metrics": {k: v for k, v in run.data.metrics.items()
                            if k.startswith("pretrain/") and "/" in k and k.count("/") == 1},
                "data_tags": {k: v for k, v in tags.items() if k.startswith("data.")}})
            for v in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
                entry["versions"].append({"name": v.name, "version": v.version,
                                          "aliases": list(v.aliases),
                                          "tags": dict(v.tags)})
    # what users load: `models:/llmcore-pretrain@best`, resolved by the shared registry
    out["best"] = client.get_model_version_by_alias(MODEL, "best").version
    return out


def version_weights(exp: str, dest: Path) -> tuple[str, dict]:
    import mlflow
    from safetensors.torch import load_file

    versions = runs([exp])[exp]["versions"]
    if len(versions) != 1:
        raise SystemExit(f"experiment {exp}: {len(versions)} registered versions")
    v = versions[0]["version"]
    path = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v}", dst_path=str(dest)))
    found = sorted(path.rglob("model.safetensors"))
    return v, load_file(str(found[0]))


def equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(exp: str) -> dict:
    from safetensors.torch import load_file

    # the experiment as a branch, checked out, then its outputs from the DVC remote
    for cmd in (["dvc", "exp", "branch", exp, f"exp-{exp}"],
                ["git", "checkout", "-q", f"exp-{exp}"], ["dvc", "pull", "pretrain"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
    pulled = load_file(str(ROOT / "data/models/pretrain/model.safetensors"))
    subprocess.run(["git", "checkout", "-q", "-"], check=True)  # back to the branch it was on
    with tempfile.TemporaryDirectory() as tmp:
        version, registered = version_weights(exp, Path(tmp))
    return {"version": version, "tensors": len(pulled), "equal": equal(pulled, registered)}


def same(a: str, b: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        va, wa = version_weights(a, Path(tmp) / "a")
        vb, wb = version_weights(b, Path(tmp) / "b")
    return {"versions": [va, vb], "tensors": len(wa), "equal": equal(wa, wb)}


def main() -> None:
    load_env()
    cmd, args = sys.argv[1], sys.argv[2:]
    result = {"state": lambda: state(args[0]), "refused": refused, "runs": lambda: runs(args),
              "weights": lambda: weights(args[0]), "same": lambda: same(args[0], args[1])}[cmd]()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
