"""verl_ext.trainer: verl's synchronous semantics under our trainer name, and timing-independent batches."""

from __future__ import annotations

import random

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from verl_ext.trainer import DapoReweightTrainer, OrderedReplayBuffer, canonical_order


def test_trainer_reports_sync_mode_under_its_registered_name():
    """verl picks its async replay buffer, gen_batch_size override and TransferQueue checkpoints for
    any trainer_mode but "sync"; the registered name is kept aside."""
    trainer = object.__new__(DapoReweightTrainer)
    trainer.trainer_mode = "dapo_reweight"  # what verl's __init__ assigns from the config
    assert trainer.trainer_mode == "sync" and trainer.registered_trainer_mode == "dapo_reweight"


def test_canonical_order_groups_by_prompt_then_orders_by_response():
    # rows of two prompts, sessions arriving in a scrambled order; equal responses tie-break by key
    rows = [
        ("u2_0_0", [5, 6], [1, 2]), ("u1_1_0", [3], [9]), ("u1_0_0", [3], [4, 4]),
        ("u2_1_0", [5, 6], [1]), ("u1_2_0", [3], [4, 4]), ("u2_2_0", [5, 6], [0, 7]),
    ]
    expected = ["u1_0_0", "u1_2_0", "u1_1_0", "u2_2_0", "u2_1_0", "u2_0_0"]
    for seed in range(5):
        shuffled = random.Random(seed).sample(rows, len(rows))
        keys, prompts, responses = (list(col) for col in zip(*shuffled))
        assert [keys[i] for i in canonical_order(keys, prompts, responses)] == expected


def test_ordered_buffer_selects_oldest_step_then_lowest_uid():
    buffer = object.__new__(OrderedReplayBuffer)
    assert isinstance(buffer, ReplayBuffer)
    buffer.partitions = {"train": {}}
    buffer.prompt_global_steps = {"train": {"000000000007": 3, "000000000002": 4, "000000000009": 3, "000000000001": 4}}
    for _ in range(5):  # whatever the set's iteration order
        keys = set(random.sample(sorted(buffer.prompt_global_steps["train"]), 4))
        selected, _, _ = buffer._select_prompt_uids("train", keys, 3)
        assert selected == ["000000000007", "000000000009", "000000000001"]


def test_ordered_buffer_decides_only_when_nothing_is_in_flight(monkeypatch):
    """Each metadata sync waits until no prompt is pending or running (polled every poll_interval)."""
    snapshots = iter([({"a"}, set()), (set(), {"b"}), (set(), set())])
    calls = []

    def fake_sync(self):
        pending, running = next(snapshots)
        calls.append((pending, running))
        self.pending_keys, self.running_keys = {"train": pending}, {"train": running}

    monkeypatch.setattr(ReplayBuffer, "_sync_metadata_from_transfer_queue", fake_sync)
    buffer = object.__new__(OrderedReplayBuffer)
    buffer.poll_interval = 0.0
    buffer._sync_metadata_from_transfer_queue()
    assert len(calls) == 3 and buffer.pending_keys == {"train": set()} and buffer.running_keys == {"train": set()}


def test_checkpoint_is_written_after_the_steps_metrics_are_logged(monkeypatch):
    """verl saves before the step's validation and logging; the trainer defers the save until the
    step's metrics have been logged, so a checkpointed step always has its metrics."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    events = []
    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", lambda self: events.append(("save", self.global_steps)))
    monkeypatch.setattr(PPOTrainerSync, "on_train_begin", lambda self: None)
    trainer = object.__new__(DapoReweightTrainer)
    trainer.logger = type("Log", (), {"log": staticmethod(lambda data, step: events.append(("log", step)))})()
    trainer.on_train_begin()
    trainer.global_steps = 1
    trainer.logger.log(data={"x": 1}, step=1)  # a step without a save
    trainer.global_steps = 2
    trainer._save_checkpoint()  # where verl calls it: inside the step
    assert events == [("log", 1)]
    trainer.logger.log(data={"x": 2}, step=2)
    assert events == [("log", 1), ("log", 2), ("save", 2)]
