"""Scenario YAML validation: good files load, bad ones say what and how to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.fedconfig import FedConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "demo-interpretable.yaml", "ham10000-natural.yaml"])
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


def test_pact_and_sgt_sections_are_read_with_defaults():
    # Execute
    default = parse_config({"name": "x", "data": "d"})
    cfg = parse_config({"name": "x", "data": "d", "explain-images": 0,
                        "pact": {"enabled": True, "alpha-init": 4.0, "l2": 0.001},
                        "sgt": {"enabled": True, "mask-fraction": 0.2, "kl-weight": 0.5,
                                "in-qat": False}})

    # Assert
    assert not default.pact.enabled and not default.sgt.enabled
    assert default.pact.alpha_init is None and default.pact.l2 == 1e-4
    assert default.sgt.mask_fraction == 0.1 and default.sgt.kl_weight == 1.0
    assert default.explain_images == 4
    assert (cfg.pact.alpha_init, cfg.pact.l2) == (4.0, 0.001)
    assert (cfg.sgt.mask_fraction, cfg.sgt.kl_weight, cfg.sgt.in_qat) == (0.2, 0.5, False)
    assert cfg.dump()["sgt"]["mask-fraction"] == 0.2 and cfg.dump()["explain-images"] == 0


@pytest.mark.parametrize(("section", "where", "received"), [
    ({"pact": {"enabled": True, "alpha-init": 0}}, r"pact\.alpha-init", "0"),
    ({"pact": {"l2": -1}}, r"pact\.l2", "-1"),
    ({"sgt": {"mask-fraction": 1.5}}, r"sgt\.mask-fraction", "1.5"),
    ({"sgt": {"kl-weight": -0.1}}, r"sgt\.kl-weight", "-0.1"),
    ({"sgt": {"mask_fraction": 0.2}}, r"sgt\.mask_fraction", "0.2"),
    ({"explain-images": -1}, r"explain-images", "-1"),
])
def test_bad_pact_sgt_and_explain_values_name_the_key_and_the_value(section, where, received):
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "data": "d", **section}, "s.yaml")
    text = str(err.value)
    assert re.search(where, text) and f"received {received}" in text, text
    assert "kebab-case" in text  # the fix


def test_model_colour_constancy_is_a_scenario_setting():
    # Prepare / Execute
    from common.fedconfig import FedConfig

    cfg = FedConfig.model_validate({"name": "c", "data": "synthetic",
                                    "model": {"colour": "shades-of-gray"}})
    # Assert: accepted, and an unknown setting is refused naming the key
    assert cfg.model.colour == "shades-of-gray"
    with pytest.raises(ValueError, match="colour"):
        FedConfig.model_validate({"name": "c", "data": "synthetic", "model": {"colour": "sepia"}})
