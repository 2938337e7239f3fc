from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest

from training.replay import FIELDS, PackedStreams, ReplayBuffer, Transitions

STREAMS, OBS, ACT = 3, 2, 1


def step(value: float, streams: int = STREAMS, **flags: np.ndarray) -> Transitions:
    """One row whose every number is ``value`` (plus the stream index in obs), flags False unless given."""
    no = np.zeros(streams, np.bool_)
    obs = np.full((streams, OBS), value, np.float32)
    obs[:, 1] = np.arange(streams)
    return Transitions(
        obs=obs,
        action=np.full((streams, ACT), value / 1000, np.float32),
        reward=np.full(streams, value, np.float32),
        next_obs=obs + 0.5,
        terminated=flags.get("terminated", no),
        truncated=flags.get("truncated", no),
        is_first=flags.get("is_first", no),
    )


def filled(capacity: int, rows: int, seed: int = 0) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, STREAMS, OBS, ACT, seed=seed)
    for value in range(rows):
        buffer.add(step(float(value)))
    return buffer


# ---------------------------------------------------------------- layout and ring


def test_capacity_is_counted_in_transitions() -> None:
    buffer = ReplayBuffer(10, STREAMS, OBS, ACT, seed=0)
    assert buffer.rows == 10 // STREAMS == 3
    assert buffer.capacity == 9
    assert buffer.data["obs"].shape == (3, STREAMS, OBS)
    assert buffer.data["reward"].shape == (3, STREAMS)


def test_capacity_below_the_stream_count_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than"):
        ReplayBuffer(2, STREAMS, OBS, ACT, seed=0)


def test_add_copies_in_and_counts_transitions() -> None:
    buffer = ReplayBuffer(30, STREAMS, OBS, ACT, seed=0)
    row = step(7.0)
    buffer.add(row)
    row.obs[:] = -1  # the caller reuses its arrays
    assert len(buffer) == STREAMS
    assert np.all(buffer.data["obs"][0, :, 0] == 7.0)


def test_ring_wraps_and_overwrites_the_oldest_rows() -> None:
    buffer = filled(capacity=4 * STREAMS, rows=6)
    assert len(buffer) == buffer.capacity == 12
    assert buffer.cursor == 2
    assert buffer.data["reward"][:, 0].tolist() == [4.0, 5.0, 2.0, 3.0]


def test_terminated_and_truncated_are_stored_apart() -> None:
    buffer = ReplayBuffer(30, STREAMS, OBS, ACT, seed=0)
    buffer.add(step(0.0, terminated=np.array([True, False, False]), truncated=np.array([False, True, False])))
    assert buffer.data["terminated"][0].tolist() == [True, False, False]
    assert buffer.data["truncated"][0].tolist() == [False, True, False]


def test_is_first_is_stored_per_stream() -> None:
    buffer = ReplayBuffer(30, STREAMS, OBS, ACT, seed=0)
    buffer.add(step(0.0, is_first=np.ones(STREAMS, np.bool_)))
    buffer.add(step(1.0, is_first=np.array([False, True, False])))
    assert buffer.data["is_first"][:2].tolist() == [[True, True, True], [False, True, False]]


# ---------------------------------------------------------------- sampling


def test_sample_has_a_member_and_batch_axis() -> None:
    sample = filled(capacity=30, rows=5).sample(4, 7)
    assert set(sample) == {"obs", "action", "reward", "next_obs", "terminated"}
    assert sample["obs"].shape == (4, 7, OBS) and sample["obs"].dtype == np.float32
    assert sample["action"].shape == (4, 7, ACT)
    assert sample["reward"].shape == (4, 7)
    assert sample["terminated"].shape == (4, 7) and sample["terminated"].dtype == np.bool_


def test_sample_keeps_transitions_whole() -> None:
    sample = filled(capacity=300, rows=50).sample(4, 64)
    np.testing.assert_array_equal(sample["obs"][..., 0], sample["reward"])
    np.testing.assert_array_equal(sample["next_obs"], sample["obs"] + 0.5)
    assert len(np.unique(sample["obs"][..., 1])) == STREAMS  # draws from every stream


def test_sample_reads_only_filled_rows() -> None:
    buffer = ReplayBuffer(3000, STREAMS, OBS, ACT, seed=0)
    for value in (1.0, 2.0):
        buffer.add(step(value))
    assert set(np.unique(buffer.sample(4, 256)["reward"])) == {1.0, 2.0}


def test_members_draw_independently() -> None:
    sample = filled(capacity=3000, rows=500).sample(2, 32)
    assert not np.array_equal(sample["reward"][0], sample["reward"][1])


def test_sampling_an_empty_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(30, STREAMS, OBS, ACT, seed=0).sample(1, 1)


# ---------------------------------------------------------------- checkpoint state


def test_state_round_trip_restores_contents_and_rng() -> None:
    original = filled(capacity=8 * STREAMS, rows=11, seed=3)
    original.sample(2, 5)  # advance the rng
    blobs, meta = original.state()
    meta = json.loads(json.dumps(meta))  # it is stored as JSON
    copy = ReplayBuffer(8 * STREAMS, STREAMS, OBS, ACT, seed=99)
    copy.load_state(complete(blobs), meta)
    for name in FIELDS:
        np.testing.assert_array_equal(copy.data[name], original.data[name])
    assert (copy.cursor, copy.filled_rows, len(copy)) == (original.cursor, original.filled_rows, len(original))
    for _ in range(3):
        a, b = original.sample(3, 9), copy.sample(3, 9)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    original.add(step(100.0))
    copy.add(step(100.0))
    np.testing.assert_array_equal(copy.data["reward"], original.data["reward"])


def complete(blobs: dict[str, bytes | None]) -> dict[str, bytes]:
    assert all(blob is not None for blob in blobs.values())
    return {name: blob for name, blob in blobs.items() if blob is not None}


def row_bytes(buffer: ReplayBuffer) -> int:
    return buffer.nbytes // buffer.rows


def test_state_holds_only_filled_rows() -> None:
    buffer = filled(capacity=30, rows=4)
    blobs, meta = buffer.state()
    assert meta["filled_rows"] == 4
    assert sum(len(b) for b in complete(blobs).values()) == 4 * row_bytes(buffer)


def test_state_is_cut_into_shards_of_about_the_requested_size() -> None:
    probe = ReplayBuffer(1000 * STREAMS, STREAMS, OBS, ACT, seed=0)
    buffer = ReplayBuffer(1000 * STREAMS, STREAMS, OBS, ACT, seed=0, shard_mb=10 * row_bytes(probe) / 2**20)
    assert buffer.shard_rows == 10
    for i in range(25):
        buffer.add(step(float(i)))
    blobs, meta = buffer.state()
    assert list(blobs) == ["replay/00000", "replay/00001", "replay/00002"]
    assert [shard[1:] for shard in meta["shards"]] == [[0, 10], [10, 20], [20, 25]]
    assert [len(b) for b in complete(blobs).values()] == [10 * row_bytes(buffer)] * 2 + [5 * row_bytes(buffer)]


def test_only_shards_written_since_the_last_save_are_handed_out() -> None:
    probe = ReplayBuffer(30 * STREAMS, STREAMS, OBS, ACT, seed=0)
    buffer = ReplayBuffer(30 * STREAMS, STREAMS, OBS, ACT, seed=0, shard_mb=10 * row_bytes(probe) / 2**20)
    for i in range(30):
        buffer.add(step(float(i)))
    buffer.mark_saved()
    assert all(blob is None for blob in buffer.state()[0].values())
    buffer.add(step(-1.0))  # the ring wraps: row 0 is overwritten
    blobs, _ = buffer.state()
    assert [name for name, blob in blobs.items() if blob is not None] == ["replay/00000"]

    fresh = filled(capacity=30 * STREAMS, rows=30)  # the same contents, never saved: every shard is handed out
    fresh.add(step(-1.0))
    copy = ReplayBuffer(30 * STREAMS, STREAMS, OBS, ACT, seed=0, shard_mb=10 * row_bytes(probe) / 2**20)
    copy.load_state(complete(fresh.state()[0]), fresh.state()[1])
    np.testing.assert_array_equal(copy.data["reward"], buffer.data["reward"])
    assert all(blob is not None for blob in copy.state()[0].values()), "a restored buffer saves every shard next"


def test_load_state_refuses_another_layout() -> None:
    blobs, meta = filled(capacity=30, rows=4).state()
    with pytest.raises(ValueError, match="does not match"):
        ReplayBuffer(60, STREAMS, OBS, ACT, seed=0).load_state(complete(blobs), meta)


def test_load_state_refuses_a_shard_of_the_wrong_size() -> None:
    blobs, meta = filled(capacity=30, rows=4).state()
    damaged = {name: blob[:-1] for name, blob in complete(blobs).items()}
    with pytest.raises(ValueError, match="holds .* bytes, expected"):
        ReplayBuffer(30, STREAMS, OBS, ACT, seed=0).load_state(damaged, meta)


# ---------------------------------------------------------------- MEMORY.md rule 2: samples own their memory


def test_samples_own_their_memory() -> None:
    buffer = filled(capacity=300, rows=50)
    for name, array in buffer.sample(4, 16).items():
        assert array.flags.owndata, name
        assert array.base is None, name
        assert not np.shares_memory(array, buffer.data[name]), name


def test_a_held_sample_does_not_change_when_the_buffer_wraps() -> None:
    buffer = filled(capacity=4 * STREAMS, rows=4)
    sample = buffer.sample(2, 8)
    kept = {name: array.copy() for name, array in sample.items()}
    for value in range(100, 108):  # overwrite every row twice
        buffer.add(step(float(value)))
    assert buffer.data["reward"].min() >= 100
    for name in sample:
        np.testing.assert_array_equal(sample[name], kept[name])


def test_held_samples_do_not_keep_evicted_storage_alive() -> None:
    buffer = filled(capacity=300, rows=50)
    samples = [buffer.sample(4, 16) for _ in range(20)]
    storage = [weakref.ref(array) for array in buffer.data.values()]
    buffer = filled(capacity=300, rows=50)  # the old buffer and its storage are dropped
    gc.collect()
    assert all(ref() is None for ref in storage), "a held sample keeps the old storage alive"
    assert len(samples) == 20 and samples[0]["obs"].shape == (4, 16, OBS)


def test_a_buffer_larger_than_available_ram_gets_a_clear_warning() -> None:
    from training.replay import _warn_if_too_large

    with pytest.warns(UserWarning, match=r"replay buffer needs .* GiB .* lower replay.capacity"):
        _warn_if_too_large(2**50)


def test_a_small_buffer_gets_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    ReplayBuffer(capacity=1000, streams=4, obs_dim=3, act_dim=1, seed=0)
    assert not [w for w in recwarn if "replay buffer needs" in str(w.message)]


# ---------------------------------------------------------------- sequences


def test_sequences_have_shapes_and_own_their_memory() -> None:
    buffer = filled(30, 8)
    seq = buffer.sample_sequences(5, 4)
    assert sorted(seq) == sorted(FIELDS)
    assert seq["obs"].shape == (5, 4, OBS) and seq["action"].shape == (5, 4, ACT)
    assert seq["reward"].shape == seq["is_first"].shape == (5, 4)
    for name, arr in seq.items():
        assert arr.flags.owndata, name
        assert not np.shares_memory(arr, buffer.data[name]), name


def test_sequences_are_consecutive_steps_of_one_stream_and_never_span_the_cursor() -> None:
    # 10 rows, 37 written: the ring wrapped three times and its cursor sits mid-buffer. Each row's
    # value is its write step, so a sequence crossing the cursor would jump from newest to oldest.
    for written in (7, 10, 37):
        buffer = filled(30, written, seed=written)
        for length in (1, 3, min(written, 10)):
            seq = buffer.sample_sequences(200, length)
            steps = seq["obs"][..., 0]
            assert np.all(np.diff(steps, axis=1) == 1), (written, length)
            assert np.all(seq["obs"][..., 1] == seq["obs"][:, :1, 1])  # one stream per sequence
            assert steps.min() >= max(0, written - 10) and steps.max() <= written - 1  # filled rows only


def test_sequences_cover_every_start_and_stream() -> None:
    buffer = filled(30, 25)
    seq = buffer.sample_sequences(2000, 4)
    starts = {(int(s), int(c)) for s, c in zip(seq["obs"][:, 0, 0], seq["obs"][:, 0, 1], strict=True)}
    assert starts == {(s, c) for s in range(15, 22) for c in range(STREAMS)}


def test_sequences_mark_episode_starts_and_their_own_first_step() -> None:
    buffer = ReplayBuffer(60, STREAMS, OBS, ACT, seed=0)
    for value in range(20):
        buffer.add(step(float(value), is_first=np.full(STREAMS, value % 5 == 0)))
    seq = buffer.sample_sequences(300, 6)
    assert np.all(seq["is_first"][:, 0])
    steps = seq["obs"][..., 0]
    assert np.array_equal(seq["is_first"][:, 1:], steps[:, 1:] % 5 == 0)
    assert not buffer.data["is_first"][1].any()  # forcing the first step did not write to storage


def test_sequences_longer_than_the_filled_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="filled rows"):
        filled(30, 3).sample_sequences(2, 4)


def test_sequences_use_the_buffer_rng_and_resume_exactly() -> None:
    a, b = filled(30, 25, seed=3), filled(30, 25, seed=3)
    blobs, meta = a.state()
    c = ReplayBuffer(30, STREAMS, OBS, ACT, seed=99)
    c.load_state({k: v for k, v in blobs.items() if v is not None}, json.loads(json.dumps(meta)))
    first, second, third = a.sample_sequences(7, 5), b.sample_sequences(7, 5), c.sample_sequences(7, 5)
    for name in FIELDS:
        assert np.array_equal(first[name], second[name]) and np.array_equal(first[name], third[name])


# ---------------------------------------------------------------- packed streams (screened evaluation)


def test_packed_streams_keep_each_column_one_streams_consecutive_steps() -> None:
    replay = ReplayBuffer(100, 4, OBS, ACT, seed=0)
    packed = PackedStreams(replay, streams=2)
    for value in range(6):
        packed.add(step(float(value), streams=2))
    assert len(replay) == 0 and packed.flush() == 3 and len(replay) == 12
    obs = replay.data["obs"][:3]  # (rows, columns, OBS): [step value, stream]
    assert obs[:, :, 0].T.tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    assert obs[:, :, 1].T.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert replay.data["is_first"][:3].tolist() == [[True] * 4, [False] * 4, [False] * 4]
    assert replay.data["truncated"][:3].tolist() == [[False] * 4, [False] * 4, [True] * 4]
    assert np.array_equal(replay.data["next_obs"][:3], obs + 0.5)  # transitions stay whole


def test_packed_streams_refuse_what_does_not_fill_whole_rows() -> None:
    replay = ReplayBuffer(100, 4, OBS, ACT, seed=0)
    with pytest.raises(ValueError, match="3 streams do not divide"):
        PackedStreams(replay, streams=3)
    packed = PackedStreams(replay, streams=2)
    packed.add(step(0.0, streams=2))
    with pytest.raises(ValueError, match="1 steps do not split into 2 chunks"):
        packed.flush()
