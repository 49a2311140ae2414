"""The job's state components alone: the privacy ledger, the train state, the metrics'
state, and the backend registry (the trainer composes them; tests/test_trainer_checkpoint.py
resumes them through real jobs)."""

from __future__ import annotations

import json
import math

import pytest

from privacy import accounting
from trainer.common.config import load_config
from trainer.job import privacy_plan
from trainer.job.backend import BACKENDS, backend_class
from trainer.job.ledger import PrivacyLedger
from trainer.job.train_state import TrainState, branch_reasons
from trainer.job.validation import validate


def _plan(*overrides: str) -> privacy_plan.PrivacyPlan:
    cfg = load_config("default", ["data.num_examples=1000", "ds.train_batch_size=100", "steps=50",
                                  "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", *overrides])
    return privacy_plan.resolve(cfg, validate(cfg, 1, False))


def test_the_ledger_counts_steps_and_its_epsilon_is_the_accountants():
    ledger = PrivacyLedger(_plan(), allow_privacy_change=False)
    for _ in range(7):
        ledger.record_step()
    assert ledger.segments == [(1.0, 0.1, 7)]
    for method in ("rdp", "pld"):
        assert ledger.epsilon(method) == accounting.epsilon(1.0, 0.1, 7, ledger.plan.delta, method)


def test_the_ledger_resumes_its_segments_and_composes_a_change_only_when_allowed():
    first = PrivacyLedger(_plan(), allow_privacy_change=False)
    for _ in range(5):
        first.record_step()
    state = first.state_dict()
    assert state["epsilon_rdp"] == first.epsilon("rdp")
    same = PrivacyLedger(_plan(), allow_privacy_change=False)
    same.load_state_dict(state)
    assert same.segments == [(1.0, 0.1, 5)]
    with pytest.raises(ValueError, match="changed sigma.*allow_privacy_change"):
        PrivacyLedger(_plan("privacy.noise_multiplier=2.0"), allow_privacy_change=False).load_state_dict(state)
    composed = PrivacyLedger(_plan("privacy.noise_multiplier=2.0"), allow_privacy_change=True)
    composed.load_state_dict(state)
    assert composed.segments == [(1.0, 0.1, 5), (2.0, 0.1, 0)]
    composed.record_step()
    assert composed.epsilon("rdp") == accounting.epsilon_of_segments([(1.0, 0.1, 5), (2.0, 0.1, 1)],
                                                                     composed.plan.delta, "rdp")
    cfg = load_config("default", ["data.num_examples=1000", "ds.train_batch_size=100", "privacy.enabled=false"])
    off = PrivacyLedger(privacy_plan.resolve(cfg, validate(cfg, 1, True)), allow_privacy_change=True)
    with pytest.raises(ValueError, match="privacy.enabled=True"):
        off.load_state_dict(state)
    assert off.epsilon() == math.inf


def test_the_guard_stops_at_the_last_step_within_the_target():
    ledger = PrivacyLedger(_plan("privacy.noise_multiplier=null", "privacy.target_epsilon=2.0"), False)
    assert ledger.stop_step(0, 50) == 50  # sigma calibrated for 50 steps
    loose = PrivacyLedger(_plan("privacy.noise_multiplier=1.0", "privacy.target_epsilon=2.0"), False)
    stop, plan = loose.stop_step(0, 50), loose.plan
    assert 1 < stop < 50
    assert accounting.epsilon(1.0, 0.1, stop, plan.delta, plan.accountant) <= 2.0 < accounting.epsilon(
        1.0, 0.1, stop + 1, plan.delta, plan.accountant)
    resumed = PrivacyLedger(plan, False)  # resumed at step 10 of the same setting: the same stop
    resumed.segments = [(1.0, 0.1, 10)]
    assert resumed.stop_step(10, 50) == stop


def test_the_train_state_round_trips_and_a_branch_is_a_child_of_the_saved_lineage(tmp_path):
    cfg = load_config("default", [f"checkpoint.dir={tmp_path}"])
    written = {"train_state": None, "config": json.loads(json.dumps(cfg.to_dict()))}  # as meta.json holds it
    saved = TrainState(cfg, sampling_seed=11, backend="fsdp2", world_size=2)
    saved.step = 9
    state = written["train_state"] = saved.state_dict()
    resumed = TrainState(cfg, sampling_seed=99, backend="fsdp2", world_size=2)
    resumed.load_state_dict(state)
    assert (resumed.step, resumed.sampling_seed, resumed.lineage) == (9, 11, saved.lineage)
    assert branch_reasons(cfg, written) == []
    other = load_config("default", [f"checkpoint.dir={tmp_path}", "optim.lr=0.5"])
    reasons = branch_reasons(other, written)
    assert len(reasons) == 1 and "optim.lr" in reasons[0]
    assert branch_reasons(load_config("default", [f"checkpoint.dir={tmp_path}", "steps=7"]),
                          written) == []  # a requeue
    resumed.branch(reasons, 1234, "elsewhere")
    assert resumed.lineage["parent"] == saved.lineage["id"] != resumed.lineage["id"]
    assert resumed.lineage["salts"][-1]["salt"] == 1234


def test_backends_are_registered_in_one_place_and_describe_themselves():
    assert set(BACKENDS) == {"fsdp2", "deepspeed"}
    with pytest.raises(ValueError, match="backend must be one of fsdp2, deepspeed"):
        backend_class("zero")
    cfg = load_config("default", ["backend=deepspeed", "ds.zero_optimization.stage=3"])
    assert "ZeRO stage 3" in backend_class("deepspeed").describe(cfg)
    assert "FSDP2" in backend_class("fsdp2").describe(load_config("default"))


def test_a_train_state_without_its_step_or_seed_is_refused(tmp_path):
    state = TrainState(load_config("default", [f"checkpoint.dir={tmp_path}"]), 1, "fsdp2", 1)
    with pytest.raises(ValueError, match="no step or sampling_seed"):
        state.load_state_dict({"step": None, "lineage": None})
