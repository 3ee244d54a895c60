from pathlib import Path

import pytest

from ray_ft.config import ConfigError, load_config, parse_overrides, save_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.method.name
    assert Path(cfg.data.path).exists() or cfg.data.path.startswith(("s3://", "gs://"))


def test_defaults_are_lora_on_embedded_model():
    cfg = load_config(None)
    assert cfg.method.name == "lora"
    assert cfg.model.name_or_path.startswith("embedded:")


def test_overrides_win_and_are_typed(tmp_path):
    cfg = load_config(
        REPO / "jobs/lora.yaml", ["train.max_steps=7", "method.r=4", "output_dir=/x/y", "data.val_fraction=0.2"]
    )
    assert cfg.train.max_steps == 7 and cfg.method.r == 4 and cfg.output_dir == "/x/y"
    assert cfg.data.val_fraction == pytest.approx(0.2)


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "jobs/lora.yaml", ["train.lrr=1e-3"])
    assert "train.lrr: unknown key" in str(e.value)
    assert "jobs/lora.yaml" in str(e.value)


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.r=many", "data.val_fraction=1.5"])
    msg = str(e.value)
    assert "method.r" in msg and "'many'" in msg
    assert "data.val_fraction: must be < 1" in msg


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match=r"method.*unknown method 'adapterx'.*lora"):
        load_config(None, ["method.name=adapterx"])


def test_yaml_syntax_error_has_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_top_level_must_be_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_template_must_end_with_answer():
    with pytest.raises(ConfigError, match=r"data.template"):
        load_config(None, ["data.template='{answer} then {question}'"])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "jobs/lora.yaml", ["method.r=8"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
