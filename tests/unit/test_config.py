"""Config tree: presets, YAML, overrides, dumps, and every validation rule's message."""

import pytest
import yaml

from megafusion.config import (
    ConfigError,
    config_from_dict,
    config_problems,
    config_to_dict,
    dump_config,
    list_presets,
    load_config,
    validate_config,
)


def test_presets_load_and_validate():
    assert {"tiny", "llama3-8b-fusion", "llama3-70b-fusion"} <= set(list_presets())
    for name in list_presets():
        validate_config(load_config(name))


@pytest.mark.parametrize(
    "preset,layers,hidden,ffn,heads,kv",
    [("llama3-8b-fusion", 32, 4096, 14336, 32, 8), ("llama3-70b-fusion", 80, 8192, 28672, 64, 8)],
)
def test_real_llama3_dimensions(preset, layers, hidden, ffn, heads, kv):
    m = load_config(preset).model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_kv_heads) == (
        layers,
        hidden,
        ffn,
        heads,
        kv,
    )
    assert m.vocab_size == 128256 and m.rope_theta == 500000.0
    rs = m.rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (
        "llama3",
        8.0,
        1.0,
        4.0,
        8192,
    )
    assert (m.boi_token_id, m.eoi_token_id) == (128002, 128003)


def test_tiny_is_a_few_million_parameters():
    m = load_config("tiny").model
    per_layer = 2 * (
        m.hidden_size * (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim
        + m.hidden_size**2
        + 3 * m.hidden_size * m.ffn_hidden_size
    )
    total = m.num_layers * per_layer + 2 * m.vocab_size * m.hidden_size
    assert 5e5 < total < 5e6


def test_overrides_typed_and_nested():
    c = load_config(
        "tiny",
        [
            "model.hidden_size=256",
            "parallel.sequence_parallel=true",
            "optim.lr=3e-4",
            "model.rope_scaling.factor=4",
            "data.path=/x/y",
        ],
    )
    assert c.model.hidden_size == 256 and c.parallel.sequence_parallel is True
    assert c.optim.lr == 3e-4 and c.model.rope_scaling.factor == 4.0 and c.data.path == "/x/y"


@pytest.mark.parametrize(
    "override,msg",
    [
        ("model.hidden_sise=3", "unknown config key 'model.hidden_sise'"),
        ("model.hidden_size=abc", "model.hidden_size: expected an integer, got 'abc'"),
        ("parallel.sequence_parallel=3", "parallel.sequence_parallel: expected true/false"),
        ("nonsense", "not of the form key.sub=value"),
    ],
)
def test_bad_overrides(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_with_base_and_dump_roundtrip(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny\nmodel:\n  num_layers: 2\n")
    c = load_config(str(p), ["seed=7"])
    assert c.model.num_layers == 2 and c.model.hidden_size == 128 and c.seed == 7
    out = dump_config(c, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load(out.read_text()))
    assert config_to_dict(again) == config_to_dict(c)


@pytest.mark.parametrize(
    "overrides,world,msg",
    [
        (
            ["parallel.tensor_parallel=3"],
            None,
            "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel=3",
        ),
        (
            ["model.num_kv_heads=2", "parallel.tensor_parallel=4", "model.num_attention_heads=8"],
            None,
            "model.num_kv_heads=2 is not divisible by parallel.tensor_parallel=4",
        ),
        (["parallel.pipeline_parallel=3"], None, "model.num_layers=4 is not divisible by parallel.pipeline_parallel=3"),
        (
            ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=4"],
            None,
            "model.num_layers=4 is not divisible by parallel.pipeline_parallel=2 x "
            "parallel.virtual_pipeline_stages=4 = 8",
        ),
        (
            ["parallel.tensor_parallel=2", "parallel.data_parallel=2"],
            6,
            "world size 6 != parallel.tensor_parallel=2 x parallel.pipeline_parallel=1 x parallel.data_parallel=2 = 4",
        ),
        (
            ["parallel.tensor_parallel=2"],
            3,
            "world size 3 is not divisible by parallel.tensor_parallel=2 x parallel.pipeline_parallel=1",
        ),
        (
            ["model.image.image_size=36"],
            None,
            "model.image.image_size=36 is not divisible by model.image.vae_downsample=4 x model.image.patch_size=2 = 8",
        ),
        (
            ["model.image.patch_size=3", "model.image.image_size=48"],
            None,
            "model.image.patch_size=3 must be a power of two",
        ),
        (
            ["parallel.zero_stage=2", "parallel.pipeline_parallel=2"],
            None,
            "parallel.zero_stage=2 is not supported with parallel.pipeline_parallel=2",
        ),
        (
            ["parallel.zero_stage=2", "data.global_batch_size=8"],
            2,
            "parallel.zero_stage=2 needs one micro-batch per step",
        ),
        (
            ["parallel.zero_stage=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
            2,
            "parallel.zero_stage=2 is not supported with parallel.sequence_parallel",
        ),
        (["data.global_batch_size=5"], 2, "data.global_batch_size=5 is not divisible by data.micro_batch_size=2"),
        (["model.hidden_size=130"], None, "model.hidden_size=130 is not divisible by model.num_attention_heads=4"),
        (["model.boi_token_id=999"], None, "model.boi_token_id=999 is outside the vocabulary"),
        (
            ["model.image.position_embedding=learned"],
            None,
            "model.image.position_embedding='learned' must be 'none' or 'sincos'",
        ),
        (
            ["model.image.position_embedding=sincos", "model.hidden_size=130", "model.num_attention_heads=2"],
            None,
            "model.image.position_embedding=sincos needs model.hidden_size=130 divisible by 4",
        ),
    ],
)
def test_validation_messages(overrides, world, msg):
    cfg = load_config("tiny", overrides)
    problems = config_problems(cfg, world_size=world)
    assert any(msg in p for p in problems), problems
    with pytest.raises(ConfigError, match="invalid configuration"):
        validate_config(cfg, world_size=world)


def test_valid_layout_passes_with_world_size():
    cfg = load_config("llama3-70b-fusion")
    assert config_problems(cfg, world_size=8 * 4 * 32) == []
