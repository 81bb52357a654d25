"""Which SFT recipe teaches the checkable tasks: exact match on the *val* split per recipe.

    python benchmarks/task_recipe.py --tag base --steps 600
    python benchmarks/task_recipe.py --tag letters-30 --letters-share 0.3 --steps 600
    python benchmarks/task_recipe.py --tag muon --optimizer muon --lr 0.01 --steps 600
    python benchmarks/task_recipe.py --tag arith-x2 --task-weights arithmetic=2 --steps 600

Each run fine-tunes one starting model (``--init``, default the pretrain stage's model) with
the SFT stage's own loop on conversations this script builds from the corpus's training
pools (the tasks' train words and operand pairs, the letters curriculum of
:func:`llmcore.data.curriculum.letters_conversations`, optionally the corpus's doc
conversations), then scores greedy exact match on the corpus's ``val`` task questions, with
spell / reverse / count split into single-token and multi-token words. Decisions about the
default recipe are made on these figures; the test split is not read.

Every run is appended to ``<out>/runs.jsonl`` (tag, recipe, seconds, tokens, val scores,
the split version of the pools it ran on and the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcore.config.base import parse_section  # noqa: E402
from llmcore.config.evaluate import EvaluateConfig  # noqa: E402
from llmcore.config.fetch import FetchConfig, TaskWeights  # noqa: E402
from llmcore.config.sft import SFTConfig  # noqa: E402
from llmcore.config.tasks import SYNTHETIC_TASKS  # noqa: E402
from llmcore.data.corpus import read_conversations  # noqa: E402
from llmcore.data.curriculum import (  # noqa: E402
    COMPOUND_SHARE,
    letter_pieces,
    letters_conversations,
)
from llmcore.data.packing import pack_all  # noqa: E402
from llmcore.data.tasks import synthetic_conversations  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, token_bytes  # noqa: E402
from llmcore.data.working import pieces_of, work_pieces  # noqa: E402
from llmcore.eval.evaluate import by_pieces, task_accuracy  # noqa: E402
from llmcore.model.modeldir import generation_config, read_model_config, save_model_dir  # noqa: E402
from llmcore.schema import ConfigError  # noqa: E402
from llmcore.tracking import SPLIT_VERSION  # noqa: E402
from llmcore.train.fit import FitSpec, fit  # noqa: E402


def word_of(conv: dict) -> str | None:
    keys = [k for k in conv.get("pool") or [] if k.startswith("word:")]
    return keys[-1][5:] if keys else None


def task_weights(text: str) -> TaskWeights:
    """``arithmetic=2,reverse=0.5`` on top of the pipeline's own ``fetch.synthetic_task_weights``
    (a task not named keeps the default's weight), checked as params.yaml is."""
    raw = {f.name: getattr(FetchConfig().synthetic_task_weights, f.name)
           for f in dataclasses.fields(TaskWeights)}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, _, w = part.partition("=")
        try:
            raw[task] = float(w)
        except ValueError:
            task = ""
        if task not in SYNTHETIC_TASKS:
            raise SystemExit(f"--task-weights: {part!r} is not TASK=WEIGHT with a task of "
                             f"{', '.join(SYNTHETIC_TASKS)} and a number")
    try:
        return parse_section("fetch", {"synthetic_task_weights": raw}, FetchConfig).synthetic_task_weights
    except ConfigError as exc:
        raise SystemExit(f"--task-weights: {exc}") from None


def build_train(args: argparse.Namespace, tok: LLMTokenizer, corpus: Path) -> list[list[dict]]:
    # each task draws from a stream of its own: a weight adds (or drops) that task's only
    want = task_weights(args.task_weights).counts(args.per_task)
    convs = [c.as_dicts() for c in synthetic_conversations(want, args.seed)]
    held = {w for s in ("val", "test") for c in read_conversations(corpus, s)
            if (w := word_of(c))}
    if args.letters_share > 0:
        pieces = letter_pieces((tok.decode([i]) for i in range(tok.vocab_size)), held)
        n = int(len(convs) * args.letters_share / (1 - args.letters_share))
        convs += [c.as_dicts() for c in letters_conversations(pieces, n, args.seed, held)]
    if args.docs:
        convs += [c["messages"] for c in read_conversations(corpus, "train") if c["task"] == "doc"]
    if args.working == "pieces":
        convs = [work_pieces(c, pieces_of(tok)) for c in convs]
    random.Random(args.seed).shuffle(convs)
    return convs


def init_steps(init: str) -> int | None:
    """The optimizer steps the starting model was trained for (its meta.json), None from scratch."""
    meta = ROOT / init / "meta.json"
    return json.loads(meta.read_text()).get("steps_trained") if meta.is_file() else None


def score(model, tok: LLMTokenizer, val: list[dict], per_task: int, max_new_tokens: int) -> dict:
    res = task_accuracy(model, tok, val, per_task, max_new_tokens, batch_size=64)
    out: dict = {t: round(r["exact_match"], 3) for t, r in res.items()}
    for task, r in res.items():
        for kind, (right, n) in by_pieces(r).items():
            out[f"{task}_{kind}"] = round(right / n, 3)
            out[f"{task}_{kind}_n"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--init", default="data/models/pretrain", help="model dir, or 'scratch'")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--per-task", type=int, default=5000)
    ap.add_argument("--task-weights", default="",
                    help="per-task multipliers of --per-task over the pipeline's "
                         "fetch.synthetic_task_weights, e.g. arithmetic=1,reverse=0.5")
    ap.add_argument("--letters-share", type=float, default=0.0)
    ap.add_argument("--docs", action="store_true", help="add the corpus's doc conversations")
    ap.add_argument("--working", choices=("plain", "pieces"), default="plain",
                    help="pieces: word-task replies list each token's letters first "
                         "(llmcore.data.working)")
    ap.add_argument("--max-new-tokens", type=int, default=EvaluateConfig().max_new_tokens,
                    help="reply length when scoring (piece lines make replies longer)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.006)
    ap.add_argument("--min-lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-per-task", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default="reports/task_recipe")
    ap.add_argument("--save", default=None, help="also write the trained model directory here")
    args = ap.parse_args()
    corpus, tok = ROOT / args.corpus, LLMTokenizer.load(ROOT / args.tokenizer)
    val = [c for c in read_conversations(corpus, "val") if c["task"] != "doc"]
    train = build_train(args, tok, corpus)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shards.mkdir()
        val_msgs = [c["messages"] for c in val]
        if args.working == "pieces":
            val_msgs = [work_pieces(m, pieces_of(tok)) for m in val_msgs]
        manifest = pack_all(tok, {}, {"train": train, "val": val_msgs},
                            shards, args.seq_len)
        init = None if args.init == "scratch" else ROOT / args.init
        model_cfg = read_model_config(init) if init else read_model_config(
            ROOT / "data/models/pretrain")
        cfg = dataclasses.replace(
            SFTConfig(), max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
            warmup_steps=args.warmup, optimizer=args.optimizer, eval_every=10**9,
            export="last", checkpoint_every=10**9, log_every=100, resume="never")
        spec = FitSpec(model=model_cfg, train=cfg, shard_dir=shards, train_split="sft_train",
                       val_split="sft_val", token_bytes=tuple(token_bytes(tok)),
                       checkpoint_dir=Path(tmp) / "ckpt", seed=args.seed, init_from=init,
                       name=args.tag)
        start = time.perf_counter()
        out = fit(spec, log=print)
        seconds = time.perf_counter() - start
    model = out.model.eval()
    if args.save:
        save_model_dir(Path(args.save), model_cfg, out.export_weights, ROOT / args.tokenizer,
                       {"tag": args.tag}, generation_config([tok.im_end_id, tok.eot_id],
                                                            tok.pad_id))
    scores = score(model, tok, val, args.eval_per_task, args.max_new_tokens)
    tokens = args.steps * args.batch_size * args.seq_len
    row = {"tag": args.tag, "split_version": SPLIT_VERSION, "machine": out.device,
           "recipe": {**vars(args), "compound_share": COMPOUND_SHARE if args.letters_share else 0},
           "init_steps": init_steps(args.init), "train_seconds": round(seconds, 1),
           "tokens": tokens, "train_conversations": len(train),
           "train_rows": manifest["splits"]["sft_train"]["rows"], "val": scores}
    print(json.dumps(row))
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
