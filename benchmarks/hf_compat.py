"""Logit parity of ``llmcore export`` under the installed transformers.

    python benchmarks/hf_compat.py [MODEL_DIR]

Exports MODEL_DIR (default: a freshly initialised cpu-small model) and loads it with
``LlamaForCausalLM`` of whatever transformers is importable, printing the version, the rotary
base it read, the largest logit difference and the top-1 agreement. Run it from an environment
with another transformers major version to check that one (e.g. a venv with
``transformers==4.57.1`` that sees this project's packages). Writes reports/hf_compat-<ver>.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmcore.config.model import parse_model  # noqa: E402
from llmcore.data.tokenizer import LLMTokenizer, train_bpe  # noqa: E402
from llmcore.export.hf import export_hf  # noqa: E402
from llmcore.model.modeldir import load_model_dir, save_model_dir, state_dict_for_save  # noqa: E402
from llmcore.model.transformer import Transformer  # noqa: E402


def main() -> None:
    import transformers
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if len(sys.argv) > 1:
            model_dir = Path(sys.argv[1])
            model, cfg = load_model_dir(model_dir)
        else:
            tok = LLMTokenizer(train_bpe(["some text to train a tokenizer on"] * 20, 300, 1))
            tok.save(tmp / "tok")
            cfg = parse_model({"preset": "cpu-small", "vocab_size": tok.vocab_size})
            torch.manual_seed(0)
            model = Transformer(cfg).eval()
            model_dir = tmp / "m"
            save_model_dir(model_dir, cfg, state_dict_for_save(model), tmp / "tok", {},
                           {"eos_token_id": [2, 0], "pad_token_id": 3})
        out = export_hf(model_dir, tmp / "hf")
        hf = LlamaForCausalLM.from_pretrained(str(out)).eval()
        x = torch.randint(4, cfg.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = hf(input_ids=x).logits, model(x)
        theta = getattr(hf.config, "rope_theta", None) or \
            (getattr(hf.config, "rope_parameters", None) or {}).get("rope_theta")
        result = {"transformers": transformers.__version__, "rope_theta_read": theta,
                  "rope_theta_expected": cfg.rope_theta,
                  "max_abs_logit_diff": float((a - b).abs().max()),
                  "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    print(json.dumps(result, indent=2))
    (REPO / "reports").mkdir(exist_ok=True)
    name = f"hf_compat-{transformers.__version__.split('.')[0]}.json"
    (REPO / "reports" / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
