"""``python -m pipeline.team``: the hub (up, down, status, authorize, backup), a checkout's
side (connect, run) and a training host's (worker). See docs/teams.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.team import client, stack
from pipeline.team.services import StackError, authorize_key
from pipeline.team.settings import ENV_FILE, PORTS, Hub, default_state_dir, load_team_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.team", description=__doc__)
    ap.add_argument("--state", type=Path, default=None,
                    help=f"the hub's folder (default {default_state_dir()})")
    sub = ap.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the hub (PostgreSQL, MLflow, Prefect, sshd)")
    u.add_argument("--host", required=True, help="the address other hosts reach the hub at")
    u.add_argument("--bind", default="", help="address to listen on (default: --host)")
    for name, port in PORTS.items():
        u.add_argument(f"--{name}-port", type=int, default=port)
    sub.add_parser("down", help="stop the hub's servers (their data is kept)")
    sub.add_parser("status", help="which of the hub's servers run")
    a = sub.add_parser("authorize", help="let a host's SSH key reach git and the DVC remote")
    a.add_argument("public_key", type=Path)
    b = sub.add_parser("backup", help="dump the databases and the stores into a folder")
    b.add_argument("dest", type=Path)
    c = sub.add_parser("connect", help="point this checkout at the hub")
    c.add_argument("--env", type=Path, required=True, help="the hub's client.env")
    c.add_argument("--key", type=Path, default=Path("~/.ssh/id_ed25519"))
    c.add_argument("--checkout", type=Path, default=Path("."))
    w = sub.add_parser("worker", help="serve pool llmcore from a persistent checkout")
    w.add_argument("--checkout", type=Path, required=True)
    w.add_argument("--env", type=Path, required=True, help="the hub's client.env")
    w.add_argument("--key", type=Path, default=Path("~/.ssh/id_ed25519"))
    w.add_argument("--name", default=None, help="worker name (default: the host name)")
    r = sub.add_parser("run", help="run the pipeline at a pushed commit on a free worker")
    r.add_argument("--commit", default="HEAD")
    r.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    r.add_argument("--stage", action="append", dest="stages")
    r.add_argument("--name", default=None, help="experiment name")
    r.add_argument("--wait", action="store_true", help="wait for the run to end")
    r.add_argument("--checkout", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    state = (args.state or default_state_dir()).resolve()
    try:
        if args.command == "up":
            ports = {n: getattr(args, f"{n}_port") for n in PORTS}
            stack.up(Hub(host=args.host, bind=args.bind, state=state, ports=ports))
        elif args.command in ("down", "status", "authorize", "backup"):
            hub = Hub.load(state)
            if args.command == "down":
                stack.down(hub)
            elif args.command == "status":
                print(json.dumps(stack.status(hub)))
            elif args.command == "authorize":
                added = authorize_key(hub, args.public_key.read_text())
                print(f"team: {'authorized' if added else 'already authorized'} "
                      f"{args.public_key}")
            else:
                stack.backup(hub, args.dest.resolve())
        elif args.command == "connect":
            client.connect(args.checkout, args.env, args.key)
            print(f"team: {args.checkout.resolve()} uses the hub ({ENV_FILE}, git and DVC "
                  "remote 'team')")
        elif args.command == "worker":
            client.worker(args.checkout, args.env, args.key, args.name)
        else:
            # before Prefect is imported: it reads its settings (the hub's API) at import
            load_team_env(args.checkout.resolve())
            from pipeline.flow import parse_overrides

            print(json.dumps(client.trigger(args.checkout, args.commit,
                                            parse_overrides(args.overrides), args.stages,
                                            args.name, args.wait)))
    except StackError as exc:
        print(f"team: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
