import pytest

from llmcore.config import (
    ConfigError,
    FetchConfig,
    PackConfig,
    TokenizerConfig,
    flatten,
    parse_section,
    parse_sections,
)


def test_defaults_parse():
    cfg = parse_section("tokenizer", {})
    assert cfg == TokenizerConfig()
    assert parse_section("fetch", None) == FetchConfig()


def test_bound_message_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        parse_section("tokenizer", {"vocab_size": 12})
    assert str(err.value) == "params.yaml: tokenizer.vocab_size must be >= 260 (got 12)"


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key tokenizer\.vocab_sise \(did you mean "
                                          r"vocab_size\?"):
        parse_section("tokenizer", {"vocab_sise": 1000})


def test_type_and_choice_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        parse_section("pack", {"seq_len": "long", "sft_overflow": "wrap", "rows_per_shard": 1.5})
    problems = err.value.problems
    assert "params.yaml: pack.seq_len must be an integer (got 'long')" in problems
    assert "params.yaml: pack.sft_overflow must be one of truncate, drop (got 'wrap')" in problems
    assert "params.yaml: pack.rows_per_shard must be an integer (got 1.5)" in problems


def test_bool_is_not_an_integer_and_int_is_a_float():
    with pytest.raises(ConfigError, match="pack.seq_len must be an integer"):
        parse_section("pack", {"seq_len": True})
    cfg = parse_section("fetch", {"val_fraction": 0.1, "max_documents": None})
    assert cfg.val_fraction == 0.1 and cfg.max_documents is None


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="fetch.paths must list at least one file"):
        parse_section("fetch", {"source": "files"})
    with pytest.raises(ConfigError, match="fetch.hf_dataset must name a dataset"):
        parse_section("fetch", {"source": "hf"})
    with pytest.raises(ConfigError, match=r"base.device must be auto, cpu, cuda"):
        parse_section("base", {"device": "tpu"})
    assert parse_section("base", {"device": "cuda:1"}).device == "cuda:1"


def test_held_out_fractions():
    cfg = FetchConfig()
    assert (cfg.val_fraction, cfg.test_fraction, cfg.synthetic_test_per_task) == (0.1, 0.1, 250)
    assert parse_section("fetch", {"val_fraction": 0.3, "test_fraction": 0.29}).test_fraction == 0.29
    assert parse_section("fetch", {"test_fraction": 0.0}).test_fraction == 0.0  # no test split
    with pytest.raises(ConfigError) as err:  # most data must train
        parse_section("fetch", {"val_fraction": 0.3, "test_fraction": 0.3})
    assert err.value.problems == [
        "params.yaml: fetch.val_fraction + fetch.test_fraction must be below 0.6 (got 0.3 + "
        "0.3): most data must train"]
    with pytest.raises(ConfigError, match=r"fetch.test_fraction must be < 0.5 \(got 0.5\)"):
        parse_section("fetch", {"test_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"fetch.test_fraction must be >= 0 \(got -0.1\)"):
        parse_section("fetch", {"test_fraction": -0.1})
    with pytest.raises(ConfigError, match=r"fetch.val_fraction must be > 0 \(got 0.0\)"):
        parse_section("fetch", {"val_fraction": 0.0})  # decisions always need a val split


def test_list_type_checked():
    with pytest.raises(ConfigError, match=r"fetch.paths must be a list of strings \(got 'a.txt'\)"):
        parse_section("fetch", {"source": "files", "paths": "a.txt"})


def test_section_must_be_mapping_and_sections_collect_errors():
    with pytest.raises(ConfigError) as err:
        parse_sections({"pack": [1, 2], "tokenizer": {"vocab_size": 0}}, ["pack", "tokenizer"])
    text = str(err.value)
    assert "pack must be a mapping" in text and "tokenizer.vocab_size must be >= 260" in text


def test_flatten_names_keys_by_section():
    flat = flatten("pack", PackConfig(seq_len=64))
    assert flat["pack.seq_len"] == 64 and "pack.sft_overflow" in flat


def test_evaluate_and_quantize_sections():
    cfg = parse_section("evaluate", {"context_factors": [1, 8]})
    assert cfg.context_factors == [1, 8]
    with pytest.raises(ConfigError, match=r"evaluate.context_factors must be integers >= 1 and "
                                          r"include 1"):
        parse_section("evaluate", {"context_factors": [2, 4]})
    assert parse_section("evaluate", {"models": ["sft"]}).models == ["sft"]
    for bad in ([], ["sft", "sft"], ["chat"]):
        with pytest.raises(ConfigError, match=r"evaluate.models must be a non-empty list of "
                                              r"distinct names from pretrain, sft, dpo, rl"):
            parse_section("evaluate", {"models": bad})
    with pytest.raises(ConfigError, match="quantize.method must be one of int8, int4"):
        parse_section("quantize", {"method": "int3"})
    with pytest.raises(ConfigError, match=r"sft.epochs must be > 0 \(got 0.0\)"):
        parse_section("sft", {"epochs": 0})


def test_params_yaml_lists_every_key_and_validates():
    """`dvc exp run -S section.key=value` needs the key to exist in params.yaml."""
    import dataclasses
    from pathlib import Path

    import yaml

    from llmcore.config import SECTIONS

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for name, cls in SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(params[name])
        assert not missing, f"params.yaml section {name} lacks {sorted(missing)}"
    cfgs = parse_sections(params, list(SECTIONS))
    assert cfgs["model"].preset == "cpu-mini" and cfgs["model"].d_model == 128


def test_model_nulls_mean_the_presets_value():
    cfg = parse_section("model", {"preset": "gpt2-mini", "positions": None, "d_model": None,
                                  "n_layers": 3})
    assert (cfg.positions, cfg.d_model, cfg.n_layers) == ("learned", 384, 3)
    assert parse_section("model", {"preset": None}).preset == "cpu-mini"


def test_schema_defaults_are_the_params_yaml_defaults():
    """One source of truth: a section left out of params.yaml means what params.yaml says."""
    from pathlib import Path

    import yaml

    from llmcore.config import SECTIONS, SFTConfig, TrainConfig

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for name, cls in SECTIONS.items():
        if name == "model":
            assert parse_section("model", params["model"]) == parse_section("model", {}), name
        else:
            assert parse_section(name, params[name]) == cls(), name
    assert SECTIONS["pretrain"] is TrainConfig and SECTIONS["sft"] is SFTConfig
    assert TrainConfig().max_steps != SFTConfig().max_steps  # the two differ, each as its yaml
