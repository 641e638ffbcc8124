"""Scenario YAML validation: good files load, bad ones say what and how to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.fedconfig import FedConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "ham10000-natural.yaml"])
def test_shipped_scenarios_are_valid(name):
    # Execute
    cfg = load_config(ROOT / "simulations" / name, {"data": "synthetic:n=60"})

    # Assert
    assert isinstance(cfg, FedConfig)
    assert cfg.quorum.min_sites <= cfg.partition.sites


def test_demo_is_small():
    cfg = load_config(ROOT / "simulations" / "demo.yaml")
    assert cfg.data.startswith("synthetic:") and cfg.model.size <= 48
    assert cfg.partition.sites == 3


def test_unknown_strategy_names_the_value_and_the_choices():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "d", "strategy": {"name": "fedsgd"}}, "s.yaml")
    text = str(err.value)
    assert "strategy.name" in text and "'fedsgd'" in text
    assert "fedavg, fedprox, fedadam" in text


def test_unknown_variant_is_refused():
    with pytest.raises(ConfigError, match=r"model\.variant.*'qana-akd2000'"):
        parse_config({"name": "x", "data": "d", "model": {"variant": "qana-akd2000"}})


def test_snake_case_key_is_refused_with_a_hint():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "d", "local_epochs": 2})
    assert "local_epochs" in str(err.value) and "kebab-case" in str(err.value)


def test_kebab_case_keys_are_read():
    cfg = parse_config({"name": "x", "data": "d", "local-epochs": 2,
                        "strategy": {"name": "fedprox", "proximal-mu": 0.1}})
    assert cfg.local_epochs == 2 and cfg.strategy.proximal_mu == 0.1
    assert cfg.dump()["local-epochs"] == 2


def test_fedprox_without_mu_is_refused():
    with pytest.raises(ConfigError, match="proximal-mu > 0"):
        parse_config({"name": "x", "data": "d", "strategy": {"name": "fedprox"}})


def test_quorum_larger_than_the_federation_is_refused():
    with pytest.raises(ConfigError, match="min-sites=5.*partition.sites=3"):
        parse_config({"name": "x", "data": "d", "partition": {"sites": 3},
                      "quorum": {"min-sites": 5, "min-replies": 2}})


def test_bad_yaml_syntax_gives_the_line(tmp_path):
    # Prepare
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: d\nrounds:\n  warmup: 2\n   qat: 1\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"not valid YAML at line 5"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
