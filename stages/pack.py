"""DVC stage ``pack``: encode the corpus into token-row Arrow shards in ``data/shards/``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from llmcore.config.pack import PackConfig
from llmcore.data.corpus import read_conversations, read_documents
from llmcore.data.curriculum import held_out_words, mix_letters
from llmcore.data.packing import pack_all
from llmcore.data.splits import SPLITS, pool_breach
from llmcore.data.tokenizer import LLMTokenizer
from llmcore.files import atomic_dir
from llmcore.schema import UserError
from llmcore.tracking import Tracker
from stages import paths
from stages._common import StageParams, log, repo_root, run_stage

STAGE = "pack"
CORPUS, TOKENIZER, OUT = paths.CORPUS, paths.TOKENIZER, paths.SHARDS


@dataclass(frozen=True)
class Params(StageParams):
    pack: PackConfig


def body(p: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, root = p.pack, repo_root()
    tok = LLMTokenizer.load(root / TOKENIZER)
    docs = {s: read_documents(root / CORPUS, s) for s in SPLITS}
    convs = {s: read_conversations(root / CORPUS, s) for s in SPLITS}
    # the split contract, checked where the rows are made: cheap, and before any training
    breach = pool_breach({**{f"pretrain_{s}": v for s, v in docs.items()},
                          **{f"sft_{s}": v for s, v in convs.items()}})
    if breach:
        raise UserError(f"{CORPUS}: {breach}; run `dvc repro fetch`")
    pretrain = {s: [d["text"] for d in v] for s, v in docs.items()}
    sft = {s: [c["messages"] for c in v] for s, v in convs.items()}
    # the letters curriculum: never a piece that is a val or test word
    held = held_out_words(convs)
    letters = mix_letters(sft["train"], (tok.decode([i]) for i in range(tok.vocab_size)), held,
                          cfg.letters_share)
    total = sum(map(len, pretrain.values())) + sum(map(len, sft.values()))
    with tqdm(total=total, desc="pack", unit="doc", mininterval=1.0) as bar:
        manifest = atomic_dir(root / OUT, lambda tmp: pack_all(
            tok, pretrain, sft, tmp, cfg.seq_len, cfg.rows_per_shard, cfg.sft_overflow,
            cfg.batch_documents, cfg.sft_packing, progress=bar.update,
            chat_share=cfg.pretrain_chat_share))
    metrics = {"pack/seconds": manifest["seconds"]}
    written = 0
    for name, s in manifest["splits"].items():
        metrics[f"pack/{name}_rows"] = s["rows"]
        metrics[f"pack/{name}_tokens"] = s["tokens"]
        written += s["tokens"]
        produced = max(s["source_tokens"], 1)
        metrics[f"pack/{name}_cropped_fraction"] = round(s["cropped_tokens"] / produced, 5)
        if s["has_loss_mask"]:
            row_tokens = max(s["rows"] * manifest["row_len"], 1)
            metrics[f"pack/{name}_padded_fraction"] = round(s["padded_tokens"] / row_tokens, 5)
            metrics[f"pack/{name}_conversations"] = s["conversations"]
            metrics[f"pack/{name}_truncated"] = s["truncated_rows"]
            metrics[f"pack/{name}_dropped"] = s["dropped_rows"]
            metrics[f"pack/{name}_target_tokens"] = s["target_tokens"]
    chat = manifest["splits"]["pretrain_train"]
    metrics["pack/pretrain_chat_conversations"] = chat["chat_conversations"]
    metrics["pack/pretrain_chat_share"] = round(chat["chat_tokens"] / max(chat["source_tokens"], 1), 4)
    metrics["pack/letters_pieces"], metrics["pack/letters_conversations"] = letters
    metrics["pack/tokens"] = written
    metrics["pack/tokens_per_second"] = round(written / max(manifest["seconds"], 1e-9), 1)
    log(f"pack: {written} tokens in {manifest['seconds']:.1f}s "
        f"({metrics['pack/tokens_per_second']:.0f} tokens/s)")
    return metrics


def main() -> None:
    run_stage(STAGE, body, Params)


if __name__ == "__main__":
    main()
