"""A site's check of the signed global model it receives in the finalize round, on real keys:
the release verifies for the arrays sent; unsigned, wrongly signed, altered, replayed or
re-weighted releases and a different Akida conversion are refused naming what failed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import SecurityError
from common.received_release import (
    arrays_sha256,
    check_akida_hash,
    sign_for_sites,
    verify_received,
)
from common.release import generate_release_keypair, verify_release

RUN, STEP, AKIDA = "run-1", 4, "ab" * 32


@pytest.fixture
def sent(tmp_path: Path):
    """A signed 'global model': its file, keys, arrays and the release sent with them."""
    keys, other = tmp_path / "keys", tmp_path / "other"
    generate_release_keypair(keys / "release.key", keys / "release.pub")
    generate_release_keypair(other / "release.key", other / "release.pub")
    model = tmp_path / "global_model.fbz"
    model.write_bytes(b"akida model bytes")
    arrays = {"conv/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
              "act/alpha": np.array(6.0, np.float32)}
    release = sign_for_sites(model, keys / "release.key", arrays, run_id=RUN, round=STEP,
                             akida_hash=AKIDA)
    return {"model": model, "pub": keys / "release.pub", "other": other, "arrays": arrays,
            "release": release}


def _check(sent, release=None, key=None, arrays=None, run_id=RUN, step=STEP):
    return verify_received(sent["release"] if release is None else release,
                           sent["pub"] if key is None else key,
                           sent["arrays"] if arrays is None else arrays,
                           site_id="site-0", run_id=run_id, step=step)


def test_the_digest_depends_on_values_dtypes_shapes_and_names_not_on_order():
    a = {"x": np.zeros((2, 3), np.float32), "y": np.ones(2, np.int8)}
    assert arrays_sha256(a) == arrays_sha256(dict(reversed(list(a.items()))))
    assert arrays_sha256(a) == arrays_sha256({k: v.copy() for k, v in a.items()})
    for changed in ({**a, "x": a["x"] + 1e-7}, {**a, "x": a["x"].astype(np.float64)},
                    {**a, "x": a["x"].reshape(3, 2)}, {"z": a["x"], "y": a["y"]},
                    {"x": a["x"]}):
        assert arrays_sha256(changed) != arrays_sha256(a)


def test_a_release_for_the_arrays_received_verifies_and_is_also_the_files_release(sent):
    manifest = _check(sent)
    assert manifest["weights_sha256"] == arrays_sha256(sent["arrays"])
    assert manifest["akida_hash"] == AKIDA and manifest["run_id"] == RUN
    check_akida_hash(manifest, AKIDA, site_id="site-0", step=STEP)
    assert verify_release(sent["model"], sent["pub"]) == manifest  # written beside the model


@pytest.mark.parametrize("case, expected", [
    ("unsigned", "unsigned"),
    ("wrong key", "not the trusted key"),
    ("manifest edited", "altered after it was signed"),
    ("weights changed", "are not the signed ones"),
    ("another round", "replayed"),
    ("not json", "not JSON"),
])
def test_the_site_refuses_naming_what_failed(sent, case, expected):
    # Prepare
    args = {}
    if case == "unsigned":
        args["release"] = ""
    elif case == "wrong key":
        args["key"] = sent["other"] / "release.pub"
    elif case == "manifest edited":
        doc = json.loads(sent["release"])
        doc["manifest"]["weights_sha256"] = arrays_sha256({"forged": np.zeros(1)})
        args["release"] = json.dumps(doc)
    elif case == "weights changed":
        args["arrays"] = {**sent["arrays"], "act/alpha": np.array(7.0, np.float32)}
    elif case == "another round":
        args["step"] = STEP + 1
    elif case == "not json":
        args["release"] = "{not json"

    # Execute
    with pytest.raises(SecurityError) as err:
        _check(sent, **args)

    # Assert
    assert expected in err.value.problem
    assert "site site-0 refuses the global model" in err.value.problem
    assert "no on-chip learning" in err.value.problem and "release.pub" in err.value.fix


def test_another_akida_conversion_is_refused(sent):
    with pytest.raises(SecurityError, match="not the released model"):
        check_akida_hash(_check(sent), "cd" * 32, site_id="site-0", step=STEP)


def test_a_site_without_a_key_is_not_checked_and_warns_once(sent, caplog):
    # Prepare
    import common.received_release as rr

    rr._warned.discard("site-9")

    # Execute
    with caplog.at_level("WARNING"):
        results = [verify_received("", None, sent["arrays"], site_id="site-9", run_id=RUN,
                                   step=STEP) for _ in range(2)]

    # Assert
    assert results == [None, None]
    check_akida_hash(None, "anything", site_id="site-9", step=STEP)
    warnings = [r for r in caplog.records if "no release-public-key" in r.getMessage()]
    assert len(warnings) == 1
