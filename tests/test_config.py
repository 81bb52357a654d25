import pytest

from llmcore.config.base import (
    BaseConfig,
    flatten,
    parse_section,
    parse_sections,
    section_names,
)
from llmcore.config.dpo import DPOConfig
from llmcore.config.evaluate import EvaluateConfig
from llmcore.config.fetch import FetchConfig
from llmcore.config.flow import FlowConfig
from llmcore.config.model import ModelConfig, parse_model
from llmcore.config.pack import PackConfig
from llmcore.config.pretrain import PretrainConfig
from llmcore.config.quantize import QuantizeConfig
from llmcore.config.rl import RLConfig
from llmcore.config.sft import SFTConfig
from llmcore.config.tokenizer import TokenizerConfig
from llmcore.config.train import TrainConfig
from llmcore.schema import ConfigError

# every section of params.yaml and its schema, each in its own module of llmcore.config
SCHEMAS = {"base": BaseConfig, "fetch": FetchConfig, "tokenizer": TokenizerConfig,
           "pack": PackConfig, "model": ModelConfig, "pretrain": PretrainConfig, "sft": SFTConfig,
           "dpo": DPOConfig, "rl": RLConfig, "evaluate": EvaluateConfig,
           "quantize": QuantizeConfig, "flow": FlowConfig}


def test_defaults_parse():
    cfg = parse_section("tokenizer", {}, TokenizerConfig)
    assert cfg == TokenizerConfig()
    assert parse_section("fetch", None, FetchConfig) == FetchConfig()


def test_bound_message_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        parse_section("tokenizer", {"vocab_size": 12}, TokenizerConfig)
    assert str(err.value) == "params.yaml: tokenizer.vocab_size must be >= 260 (got 12)"


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key tokenizer\.vocab_sise \(did you mean "
                                          r"vocab_size\?"):
        parse_section("tokenizer", {"vocab_sise": 1000}, TokenizerConfig)


def test_type_and_choice_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        parse_section("pack", {"seq_len": "long", "sft_overflow": "wrap", "rows_per_shard": 1.5}, PackConfig)
    problems = err.value.problems
    assert "params.yaml: pack.seq_len must be an integer (got 'long')" in problems
    assert "params.yaml: pack.sft_overflow must be one of truncate, drop (got 'wrap')" in problems
    assert "params.yaml: pack.rows_per_shard must be an integer (got 1.5)" in problems


def test_bool_is_not_an_integer_and_int_is_a_float():
    with pytest.raises(ConfigError, match="pack.seq_len must be an integer"):
        parse_section("pack", {"seq_len": True}, PackConfig)
    cfg = parse_section("fetch", {"val_fraction": 0.1, "max_documents": None}, FetchConfig)
    assert cfg.val_fraction == 0.1 and cfg.max_documents is None


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="fetch.paths must list at least one file"):
        parse_section("fetch", {"source": "files"}, FetchConfig)
    with pytest.raises(ConfigError, match="fetch.hf_dataset must name a dataset"):
        parse_section("fetch", {"source": "hf"}, FetchConfig)
    with pytest.raises(ConfigError, match=r"base.device must be auto, cpu, cuda"):
        parse_section("base", {"device": "tpu"}, BaseConfig)
    assert parse_section("base", {"device": "cuda:1"}, BaseConfig).device == "cuda:1"


def test_held_out_fractions():
    cfg = FetchConfig()
    assert (cfg.val_fraction, cfg.test_fraction, cfg.synthetic_test_per_task) == (0.1, 0.1, 250)
    assert parse_section("fetch", {"val_fraction": 0.3, "test_fraction": 0.29}, FetchConfig).test_fraction == 0.29
    assert parse_section("fetch", {"test_fraction": 0.0}, FetchConfig).test_fraction == 0.0  # no test split
    with pytest.raises(ConfigError) as err:  # most data must train
        parse_section("fetch", {"val_fraction": 0.3, "test_fraction": 0.3}, FetchConfig)
    assert err.value.problems == [
        "params.yaml: fetch.val_fraction + fetch.test_fraction must be below 0.6 (got 0.3 + "
        "0.3): most data must train"]
    with pytest.raises(ConfigError, match=r"fetch.test_fraction must be < 0.5 \(got 0.5\)"):
        parse_section("fetch", {"test_fraction": 0.5}, FetchConfig)
    with pytest.raises(ConfigError, match=r"fetch.test_fraction must be >= 0 \(got -0.1\)"):
        parse_section("fetch", {"test_fraction": -0.1}, FetchConfig)
    with pytest.raises(ConfigError, match=r"fetch.val_fraction must be > 0 \(got 0.0\)"):
        parse_section("fetch", {"val_fraction": 0.0}, FetchConfig)  # decisions always need a val split


def test_list_type_checked():
    with pytest.raises(ConfigError, match=r"fetch.paths must be a list of strings \(got 'a.txt'\)"):
        parse_section("fetch", {"source": "files", "paths": "a.txt"}, FetchConfig)


def test_section_must_be_mapping_and_sections_collect_errors():
    with pytest.raises(ConfigError) as err:
        parse_sections({"pack": [1, 2], "tokenizer": {"vocab_size": 0}}, {"pack": PackConfig, "tokenizer": TokenizerConfig})
    text = str(err.value)
    assert "pack must be a mapping" in text and "tokenizer.vocab_size must be >= 260" in text


def test_flatten_names_keys_by_section():
    flat = flatten("pack", PackConfig(seq_len=64))
    assert flat["pack.seq_len"] == 64 and "pack.sft_overflow" in flat


def test_evaluate_and_quantize_sections():
    cfg = parse_section("evaluate", {"context_factors": [1, 8]}, EvaluateConfig)
    assert cfg.context_factors == [1, 8]
    with pytest.raises(ConfigError, match=r"evaluate.context_factors must be integers >= 1 and "
                                          r"include 1"):
        parse_section("evaluate", {"context_factors": [2, 4]}, EvaluateConfig)
    assert parse_section("evaluate", {"models": ["sft"]}, EvaluateConfig).models == ["sft"]
    for bad in ([], ["sft", "sft"]):  # a model the chain lacks: the evaluate stage refuses it
        with pytest.raises(ConfigError, match=r"evaluate.models must be a non-empty list of "
                                              r"distinct model names"):
            parse_section("evaluate", {"models": bad}, EvaluateConfig)
    with pytest.raises(ConfigError, match="quantize.method must be one of int8, int4"):
        parse_section("quantize", {"method": "int3"}, QuantizeConfig)
    with pytest.raises(ConfigError, match=r"sft.epochs must be > 0 \(got 0.0\)"):
        parse_section("sft", {"epochs": 0}, SFTConfig)


def test_params_yaml_lists_every_key_and_validates():
    """`dvc exp run -S section.key=value` needs the key to exist in params.yaml."""
    import dataclasses
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    assert list(SCHEMAS) == list(params)
    assert sorted(SCHEMAS) == section_names()
    for name, cls in SCHEMAS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(params[name])
        assert not missing, f"params.yaml section {name} lacks {sorted(missing)}"
    cfgs = parse_sections(params, SCHEMAS)
    assert cfgs["model"].preset == "cpu-mini" and cfgs["model"].d_model == 128


def test_model_nulls_mean_the_presets_value():
    cfg = parse_model({"preset": "gpt2-mini", "positions": None, "d_model": None,
                                  "n_layers": 3})
    assert (cfg.positions, cfg.d_model, cfg.n_layers) == ("learned", 384, 3)
    assert parse_model({"preset": None}).preset == "cpu-mini"


def test_schema_defaults_are_the_params_yaml_defaults():
    """One source of truth: a section left out of params.yaml means what params.yaml says."""
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for name, cls in SCHEMAS.items():
        if name == "model":
            assert parse_model(params["model"]) == parse_model({}), name
        else:
            assert parse_section(name, params[name], cls) == cls(), name
    assert TrainConfig().max_steps != SFTConfig().max_steps  # the two differ, each as its yaml


def test_each_stage_parses_its_sections_with_their_schemas():
    """A stage's Params fields name its sections' schemas (what run_stage parses with)."""
    import importlib

    from tests.test_lineage import dvc_stages, stage_module

    for name, stage in dvc_stages().items():
        module = importlib.import_module(stage_module(stage["cmd"]))
        schemas = module.Params.schemas()
        assert schemas == {k: SCHEMAS[k] for k in schemas}, name
        assert {p.partition(".")[0] for p in stage["params"]} <= set(schemas), name
