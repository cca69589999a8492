import json

import pytest

from kvshare.errors import KVShareError
from kvshare.plan import ModelShape, Plan, cla_pattern

SHAPE = ModelShape(num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16)


def test_groups_are_canonical_and_sizes_derive():
    plan = Plan(SHAPE, ((3, 3, 1, 0),) * 4, (0, 1, 2, 3), "qcqa-ac")
    assert plan.groups[0] == (0, 0, 1, 2)
    assert plan.n_kv(0) == 3
    assert plan.q_to_kv(0) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert plan.kv_fraction == pytest.approx(12 / 16)
    assert plan.kv_bytes_per_token(2) == 2 * 12 * 16 * 2


def test_cla_counts_only_storing_layers():
    plan = Plan.identity(SHAPE).with_cla(cla_pattern(4, "cla2"))
    assert plan.kv_layer == (0, 0, 2, 2)
    assert plan.kv_fraction == pytest.approx(0.5)
    assert cla_pattern(5, 3) == [0, 0, 0, 3, 3]


def test_round_trip(tmp_path):
    plan = Plan(SHAPE, ((0, 1, 0, 1),) * 4, (0, 0, 2, 2), "gqa+cla2", "mean", {"budget": 0.25})
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json", expect=SHAPE)
    assert back == plan and back.meta == {"budget": 0.25}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_layer": (0, 2, 2, 3)}, "layer 1 uses the K/V of layer 2"),
        ({"kv_layer": (0, 0, 1, 3)}, "which itself uses layer 0"),
        ({"groups": ((0, 1, 2),) * 4}, "groups 3 KV heads but the model has 4"),
        ({"groups": ((0, 1, 2, 3),) * 3}, "plan has 3 layers but the model has 4"),
    ],
)
def test_bad_plans_name_the_value(kwargs, message):
    args = {"groups": ((0, 1, 2, 3),) * 4, "kv_layer": (0, 1, 2, 3), **kwargs}
    with pytest.raises(KVShareError, match=message):
        Plan(SHAPE, args["groups"], args["kv_layer"], "x")


def test_consumer_must_share_producer_grouping():
    with pytest.raises(KVShareError, match="groups its heads differently"):
        Plan(SHAPE, ((0, 1, 2, 3), (0, 0, 1, 1), (0, 1, 2, 3), (0, 1, 2, 3)), (0, 0, 2, 3), "x")


def test_load_rejects_other_model_and_bad_json(tmp_path):
    Plan.identity(SHAPE).save(tmp_path / "p.json")
    other = ModelShape(4, 8, 2, 16)
    with pytest.raises(KVShareError, match="plan is for a model of shape"):
        Plan.load(tmp_path / "p.json", expect=other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KVShareError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"format": "v0"}))
    with pytest.raises(KVShareError, match="format 'v0'"):
        Plan.load(tmp_path / "old.json")
    with pytest.raises(KVShareError, match="CLA spec 'clax'"):
        cla_pattern(4, "clax")
