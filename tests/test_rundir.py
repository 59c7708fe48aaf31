"""The run folder's pure parts: chunks, the position after a chunk, settings, the log."""

import json

import numpy as np
import pytest

from pureflax import optim, rundir, train, vae
from pureflax.flags import as_flags
from pureflax.rundir import Chunk, Plan, Position

PLAN = Plan(steps_per_epoch=10, total=25, log_every=4, ckpt_every=6)


def test_chunks_end_at_every_log_line_checkpoint_epoch_end_and_the_run_end():
    got = list(rundir.chunks(0, PLAN))
    ends = [c.epoch * 10 + c.start + c.length for c in got]
    assert ends == [4, 6, 8, 10, 12, 14, 18, 20, 24, 25]  # log lines are per epoch (24 = epoch 2, step 4)
    assert all(c.length > 0 and c.start + c.length <= 10 for c in got)  # never across an epoch's end
    assert got[4] == Chunk(epoch=1, start=0, length=2)


def test_chunks_from_a_resumed_step_are_the_tail_of_the_whole_run():
    whole = [(c.epoch * 10 + c.start, c.length) for c in rundir.chunks(0, PLAN)]
    for step in (6, 12, 18, 24):
        assert [(c.epoch * 10 + c.start, c.length) for c in rundir.chunks(step, PLAN)] == [w for w in whole if w[0] >= step]
    assert list(rundir.chunks(25, PLAN)) == []


def test_chunks_without_periodic_checkpoints_and_a_log_window_longer_than_an_epoch():
    plan = Plan(steps_per_epoch=5, total=12, log_every=100, ckpt_every=None)
    assert [(c.epoch, c.start, c.length) for c in rundir.chunks(0, plan)] == [(0, 0, 5), (1, 0, 5), (2, 0, 2)]


def test_advance_logs_the_window_mean_and_resets_it():
    pos, row = rundir.advance(Position.start(), np.array([[1.0, 1, 0], [3.0, 2, 2]]), Plan(10, 20, 2, None))
    assert row == {"epoch": 0, "step": 2, "global_step": 2, "loss": 2.0, "mse": 1.5, "kl": 1.0}
    assert pos.window == [] and pos.epoch_sums == [4.0, 3.0, 2.0] and pos.epoch_count == 2


def test_advance_carries_a_partial_window_and_closes_the_epoch():
    plan = Plan(steps_per_epoch=3, total=6, log_every=2, ckpt_every=None)
    pos, row = rundir.advance(Position.start(), np.array([[1.0, 1, 0], [1.0, 1, 0]]), plan)
    pos, row = rundir.advance(pos, np.array([[4.0, 2, 4]]), plan)
    assert row is None  # a log window cut short by the epoch's end is not logged, as in the tutorial
    assert pos == Position(3, [], [0.0, 0.0, 0.0], 0, [2.0, 4 / 3, 4 / 3])
    assert rundir.epoch_means(pos) == [2.0, 4 / 3, 4 / 3]
    pos, _ = rundir.advance(pos, np.array([[6.0, 6, 0]]), plan)  # a run that ends mid-epoch reports that epoch
    assert rundir.epoch_means(pos) == [6.0, 6.0, 0.0]


def test_advance_over_a_run_in_chunks_equals_one_pass_over_all_steps():
    rng = np.random.default_rng(0)
    plan = Plan(steps_per_epoch=7, total=20, log_every=3, ckpt_every=4)
    metrics = rng.random((20, 3))
    pos, rows = Position.start(), []
    for chunk in rundir.chunks(0, plan):
        i = chunk.epoch * 7 + chunk.start
        pos, row = rundir.advance(pos, metrics[i : i + chunk.length], plan)
        rows += [row] if row else []
    assert [r["global_step"] for r in rows] == [3, 6, 10, 13, 17, 20]
    np.testing.assert_allclose(rows[2]["loss"], metrics[7:10, 0].mean())
    np.testing.assert_allclose(rundir.epoch_means(pos), metrics[14:20].mean(axis=0))


def test_epoch_of_is_the_epoch_the_log_named():
    assert [rundir.epoch_of(s, 10) for s in (0, 1, 10, 11, 20)] == [0, 0, 0, 1, 1]


def settings(**changes):
    config = train.TrainConfig(**changes)
    return rundir.settings_of(config, "functional", "ab" * 32)


def test_settings_are_flat_json_with_the_backend_and_data():
    s = settings()
    assert s["optim.optimizer"] == "adamw" and s["model.latent_dim"] == 32 and s["backend"] == "functional"
    assert json.loads(json.dumps(s)) == s


@pytest.mark.parametrize(
    "changes, refused",
    [({"batch_size": 32}, "--batch-size 32 differs from the run's --batch-size 16"),
     ({"seed": 1}, "--seed 1 differs from the run's --seed 65535"),
     ({"optim": optim.OptimConfig(grad_accum=2)}, "--grad-accum 2 differs from the run's --grad-accum 1"),
     ({"optim": optim.OptimConfig(freeze=("encoder",))}, "--freeze encoder differs from the run's --freeze none"),
     ({"model": vae.VAEConfig(latent_dim=4)}, "--latent-dim 4 differs from the run's --latent-dim 32")],
)
def test_compare_settings_refuses_what_changes_the_saved_state(changes, refused):
    bad, notes = rundir.compare_settings(settings(), settings(**changes))
    assert len(bad) == 1 and refused in as_flags(bad[0]) and notes == []
    assert "`resume`" in bad[0]  # the library names settings; the script shows them as flags


def test_compare_settings_notes_what_only_changes_what_comes_next():
    bad, notes = rundir.compare_settings(settings(), settings(epochs=20, kl_weight=0.1, optim=optim.OptimConfig(lr=1e-3)))
    assert bad == []
    assert notes == ["`epochs=20` from here on (the run had `epochs=10`)", "`kl_weight=0.1` from here on (the run had `kl_weight=0.5`)",
                     "`optim.lr=0.001` from here on (the run had `optim.lr=0.0001`)"]
    assert as_flags(notes[2]) == "--lr 0.001 from here on (the run had --lr 0.0001)"
    other_data = dict(settings(), data="cd" * 32)
    bad, _ = rundir.compare_settings(settings(), other_data)
    assert bad and as_flags(bad[0]).startswith("--resume: --data cdcdcdcdcdcdcdcd differs from the run's --data abababababababab")


def test_read_log_tells_a_last_line_cut_short_from_damage_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"global_step": 4, "loss": 1}\n{"global_\xffstep": 8\n{"loss": NaN}\n\n{"test_loss": 1.0}\n{"global_st')
    rows, damaged, cut = rundir.read_log(path)
    assert len(rows) == 2 and cut == b'{"global_st'
    assert damaged == [(2, b'{"global_\xffstep": 8'), (3, b'{"loss": NaN}')]  # NaN is not JSON; a blank line is nothing
    assert rundir.rows_up_to(rows, 4) == [{"global_step": 4, "loss": 1}]  # the final row is written again
    assert rundir.read_log(tmp_path / "none") == ([], [], None)
    path.write_bytes(b'{"global_step": 4, "loss": 1}')  # a last line whose newline alone was lost: a row
    assert rundir.read_log(path).rows == [{"global_step": 4, "loss": 1}]


def test_a_changed_switch_is_noted_as_the_flag_that_gives_it_not_the_inverted_setting():
    _, notes = rundir.compare_settings({"pictures": True, "fuse": False}, {"pictures": False, "fuse": True})
    assert [as_flags(note) for note in notes] == ["--fuse from here on (the run had --no-fuse)",
                                                  "--no-pictures from here on (the run had no --no-pictures)"]
