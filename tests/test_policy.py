"""Site policy: written by provisioning, validated from policy.yaml, enforced before every task,
and a refusal that reaches the coordinator in a real Flower simulation."""

from __future__ import annotations

import json

import pytest
import yaml

from common.errors import ConfigError
from common.fedconfig import parse_config
from common.metrics_crypto import key_id, load_metrics_public_key
from common.policy import PolicyRefusal, check_task, parse_policy, redact


def _cfg(**changes):
    raw = {"name": "p", "data": "synthetic", "rounds": {"warmup": 2, "qat": 1},
           "explain-images": 0, **changes}
    return parse_config(raw)


def test_provisioning_writes_a_default_policy_that_the_kit_validates_and_keeps(tmp_path):
    # Prepare
    from test_provision import _project

    from deploy.kit import validate_site_kit
    from deploy.provision import provision

    project = _project(tmp_path, ["a", "b"])
    out = tmp_path / "KITS"

    # Execute
    provision(project, out)
    kit = validate_site_kit(out / "sites" / "a")
    policy_file = out / "sites" / "a" / "policy.yaml"
    edited = policy_file.read_text().replace("max-rounds: 100", "max-rounds: 7")
    policy_file.write_text(edited)
    provision(project, out)  # a re-run never overwrites the site's own policy

    # Assert
    policy = yaml.safe_load(policy_file.read_text())
    coordinator = key_id(load_metrics_public_key(out / "coordinator" / "metrics.pub"))
    assert policy["coordinators"] == [coordinator]
    assert policy["max-rounds"] == 7 and policy["dp"]["required"] is False
    assert policy["never-send"] == [] and policy["saliency-overlays"] is True
    assert kit.node_config()["policy-file"] == str(policy_file)
    assert policy_file.read_text() == edited


def test_policy_yaml_with_an_unknown_field_is_refused_naming_file_field_and_fix(tmp_path):
    # Prepare
    from test_provision import _project

    from deploy.kit import validate_site_kit
    from deploy.provision import provision

    out = tmp_path / "KITS"
    provision(_project(tmp_path, ["a"]), out)
    path = out / "sites" / "a" / "policy.yaml"
    path.write_text(path.read_text() + "allow-images: true\n")

    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        validate_site_kit(out / "sites" / "a")
    text = str(err.value)
    assert f"{path}: allow-images: Extra inputs are not permitted (received True)" in text
    assert "Fix: fix or remove those fields; allowed: coordinators, variants, phases" in text


@pytest.mark.parametrize(("policy", "changes", "named"), [
    ({"coordinators": ["0000000000000000"]}, {}, "coordinator key abcd is not an allowed"),
    ({"variants": ["qana-akida2"]}, {}, "variant qana-akd1000 is not allowed"),
    ({"phases": ["hello", "warmup", "finalize"]}, {}, "phase calibrate is not allowed"),
    ({"max-rounds": 4}, {}, "the run has 5 rounds, more than max-rounds 4"),
    ({"dp": {"required": True}}, {}, "differential privacy is required but dp.enabled is false"),
    ({"dp": {"max-epsilon": 1.0}}, {"dp": {"enabled": True, "noise-multiplier": 0.8}},
     "spend ε="),
    ({"dp": {"max-epsilon": 100.0}}, {"dp": {"enabled": True, "delta": 1e-3}},
     "dp.delta 0.001 exceeds max-delta 1e-05"),
    ({"saliency-overlays": False}, {"explain-images": 2}, "explain-images is 2 but it writes"),
    ({"never-send": ["calibration-ranges"]}, {}, "phase calibrate would send calibration-ranges"),
])
def test_a_task_outside_policy_is_refused_naming_the_rule(policy, changes, named):
    with pytest.raises(PolicyRefusal) as err:
        check_task(parse_policy(policy), _cfg(**changes), "hello", 0, "site-9", "abcd")
    assert str(err.value).startswith("site site-9 refuses by its policy: ")
    assert named in err.value.problem and err.value.fix


def test_a_task_within_policy_runs_and_metrics_lose_what_the_site_never_sends():
    # Prepare
    policy = parse_policy({"coordinators": ["abcd"], "max-rounds": 5,
                           "dp": {"required": True, "max-epsilon": 50},
                           "never-send": ["confusion-matrices", "class-counts"]})
    cfg = _cfg(dp={"enabled": True, "noise-multiplier": 1.0})
    metrics = {"class_names": ["a", "b"], "train_class_counts": [3, 1],
               "test": {"balanced_accuracy": 0.5, "confusion_matrix": [[1, 0], [1, 0]]}}

    # Execute
    check_task(policy, cfg, "qat", 4, "site-0", "abcd")
    sent = redact(metrics, policy)

    # Assert
    assert sent == {"class_names": ["a", "b"], "test": {"balanced_accuracy": 0.5},
                    "redacted": ["class-counts", "confusion-matrices"]}
    assert redact(metrics, None) == metrics


@pytest.mark.slow
def test_a_policy_refusal_reaches_the_coordinator_in_a_simulation(tmp_path):
    # Prepare: site-2 requires DP, the scenario has none; the quorum goes on with two sites
    from test_fed_driver import _run, _scenario

    cfg = _scenario(tmp_path, strategy={"name": "fedavg"}, rounds={"warmup": 1, "qat": 0},
                    quorum={"min-sites": 3, "min-replies": 2},
                    **{"site-policies": {"default": {"max-rounds": 10},
                                         "site-2": {"dp": {"required": True}}}})
    out = tmp_path / "out"

    # Execute
    _run(cfg, out, tmp_path / "keys")

    # Assert
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    (why,) = report["hello_dropped"].values()
    assert "site site-2 refuses by its policy: differential privacy is required" in why
    assert "Fix: set dp.enabled: true" in why
    assert set(report["sites"]) == {"site-0", "site-1"}
    assert report["sites"]["site-0"]["policy"]["max-rounds"] == 10  # told at hello
    assert all(set(r["replied"]) == {"site-0", "site-1"} for r in report["rounds"])
    assert "site site-2 refuses by its policy" in (out / "report.md").read_text()
