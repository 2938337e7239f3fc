"""The pixel replay: frame stacks rebuilt from single frames exactly as the wrappers stack them."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import pytest

from tests.custom_envs.pixels import stacked
from training.frames import FrameReplay, make_replay
from training.memory.telemetry import evicted_alive_bytes
from training.replay import FIELDS, PackedStreams, ReplayBuffer, Transitions

FRAME = (8, 8)
ACT = 3


@dataclass
class Played:
    """What the envs handed out, by transition id (stored as the reward): stacks and bookkeeping."""

    obs: dict[int, np.ndarray] = field(default_factory=dict)
    next_obs: dict[int, np.ndarray] = field(default_factory=dict)
    row: dict[int, int] = field(default_factory=dict)
    """The replay row count when the transition was added (its step in the buffer's life)."""
    age: dict[int, int] = field(default_factory=dict)
    """Steps since its episode (or rollout) started."""
    rows_added: int = 0

    def expected_valid(self, rows: int, stack: int = 4) -> set[int]:
        """Ids whose every frame is still in a ring of ``rows`` rows: the rows back to
        ``row - min(age, stack)`` are among the newest ``rows``."""
        oldest = self.rows_added - rows
        return {i for i, r in self.row.items() if r - min(self.age[i], stack) >= oldest}


def play(envs: list[gym.Env], replay: FrameReplay | PackedStreams, steps: int, played: Played, seed: int = 0) -> None:
    """One rollout as ``training.rollout.rollout`` makes it: reset every env with its seed, step all
    together with random actions, auto-reset ended episodes, mark episode starts ``is_first`` and the
    last step truncated. Each transition's id goes in as its reward."""
    count = len(envs)
    obs = np.stack([env.reset(seed=seed + e)[0] for e, env in enumerate(envs)])
    is_first = np.ones(count, np.bool_)
    age = np.zeros(count, np.int64)
    rng = np.random.default_rng(seed)
    for t in range(steps):
        choice = rng.integers(0, ACT, count)
        next_obs, terminated, truncated = np.zeros_like(obs), np.zeros(count, np.bool_), np.zeros(count, np.bool_)
        after = np.zeros_like(obs)
        for e, env in enumerate(envs):
            next_obs[e], _, terminated[e], truncated[e], _ = env.step(int(choice[e]))
            after[e] = env.reset()[0] if terminated[e] or truncated[e] else next_obs[e]
        if t == steps - 1:
            truncated |= ~terminated
        ids = len(played.obs) + np.arange(count)
        for e, i in enumerate(ids.tolist()):
            played.obs[i], played.next_obs[i], played.age[i] = obs[e].copy(), next_obs[e].copy(), int(age[e])
            played.row[i] = played.rows_added
        onehot = np.eye(ACT, dtype=np.float32)[choice]
        replay.add(Transitions(obs, onehot, ids.astype(np.float32), next_obs, terminated, truncated, is_first))
        if isinstance(replay, FrameReplay):
            played.rows_added += 1
        is_first = terminated | truncated
        age = np.where(is_first, 0, age + 1)
        obs = after


def check_stacks(played: Played, sample: dict[str, np.ndarray]) -> np.ndarray:
    """Every sampled ``obs``/``next_obs`` equals the env's own stack of that transition; returns the ids."""
    ids = sample["reward"].astype(np.int64)
    for name, source in (("obs", played.obs), ("next_obs", played.next_obs)):
        expected = np.stack([source[i] for i in ids.ravel().tolist()]).reshape(sample[name].shape)
        wrong = np.flatnonzero((sample[name] != expected).reshape(ids.size, -1).any(axis=1))
        assert len(wrong) == 0, f"{name} of transitions {ids.ravel()[wrong][:10].tolist()} differ"
    return ids


def filled(
    rows: int = 20, streams: int = 2, steps: int = 50, max_length: int = 6, start_fraction: float = 0.1
) -> tuple[FrameReplay, Played]:
    """A replay of ``rows`` rows per stream after one rollout of ``steps`` steps in counting-frames envs."""
    replay = FrameReplay(rows * streams, streams, ACT, seed=0, frame_shape=FRAME, start_fraction=start_fraction)
    played = Played()
    play([stacked(max_length) for _ in range(streams)], replay, steps, played)
    return replay, played


# ---------------------------------------------------------------- reconstruction


def test_stacks_equal_the_wrappers_own_across_episode_boundaries() -> None:
    # Episodes of 1..6 steps: most rows sit near an episode start, where FrameStackObservation pads
    # with the reset frame; 50 steps into 20 rows wrap the ring twice.
    replay, played = filled()
    ids = check_stacks(played, replay.sample(8, 512))
    sampled = set(ids.ravel().tolist())
    assert sampled == played.expected_valid(replay.rows)  # every complete stack is drawn, no other
    firsts = [i for i in sampled if played.age[i] == 0]
    assert firsts and all(all(np.array_equal(played.obs[i][0], f) for f in played.obs[i]) for i in firsts)
    assert {played.age[i] for i in sampled} >= {0, 1, 2, 3, 4}


def test_pong_stacks_equal_the_wrappers_own_across_episode_boundaries() -> None:
    pytest.importorskip("ale_py")
    from training.envs import make_atari

    envs = [make_atari("ALE/Pong-v5", max_episode_steps=25) for _ in range(2)]  # forced early episode ends
    replay = FrameReplay(60 * 2, 2, ACT, seed=0)
    played = Played()
    play(envs, replay, 100, played)
    assert replay.filled_rows == replay.rows and replay.cursor == 100 % 60
    ids = check_stacks(played, replay.sample(4, 256))
    assert set(ids.ravel().tolist()) == played.expected_valid(replay.rows)
    seq = replay.sample_sequences(16, 30)
    check_stacks(played, seq)
    assert seq["obs"].shape == (16, 30, 4, 84, 84) and seq["obs"].dtype == np.uint8
    assert seq["is_first"][:, 1:].any()  # sequences cross episode starts
    for env in envs:
        env.close()


def test_an_obs_that_does_not_follow_the_previous_row_starts_a_new_context() -> None:
    # Not marked is_first and not after an ended row, yet a different stack: stored as given.
    replay = FrameReplay(40, 1, ACT, seed=0, frame_shape=FRAME, start_fraction=0.5)
    rng = np.random.default_rng(0)
    stacks = [rng.integers(0, 256, (1, 6, *FRAME), dtype=np.uint8) for _ in range(3)]  # 6 frames: 2 steps
    no = np.zeros(1, np.bool_)
    for n, frames in enumerate(stacks):
        for k in range(2):
            obs, nxt = frames[:, k : k + 4], frames[:, k + 1 : k + 5]
            replay.add(
                Transitions(obs, np.zeros((1, ACT), np.float32), np.full(1, 2 * n + k, np.float32), nxt, no, no, no)
            )
    assert replay.data["age"][:6, 0].tolist() == [0, 1, 0, 1, 0, 1]
    seq = replay.sample_sequences(1, 6)
    for n in range(3):
        for k in range(2):
            np.testing.assert_array_equal(seq["obs"][0, 2 * n + k], stacks[n][0, k : k + 4])
            np.testing.assert_array_equal(seq["next_obs"][0, 2 * n + k], stacks[n][0, k + 1 : k + 5])


def test_packed_streams_chunks_start_mid_episode_with_their_full_stacks() -> None:
    replay = FrameReplay(40 * 4, 4, ACT, seed=0, frame_shape=FRAME)
    played = Played()
    packed = PackedStreams(replay, streams=2)
    play([stacked(max_length=40) for _ in range(2)], packed, 30, played)
    played.rows_added = packed.flush()
    assert played.rows_added == 15
    mid_episode = replay.data["is_first"][0] & (replay.data["age"][0] == 0)
    assert mid_episode.all()
    seq = replay.sample_sequences(200, 15)
    check_stacks(played, seq)  # the second chunk of each stream starts with 4 distinct frames


# ---------------------------------------------------------------- the write cursor and evicted frames


def test_nothing_sampled_joins_frames_across_the_write_cursor() -> None:
    for steps in (20, 23, 57, 100):  # full, just wrapped, wrapped with the cursor mid-ring, many times
        replay, played = filled(rows=20, steps=steps, max_length=12)
        ids = check_stacks(played, replay.sample(8, 512))
        assert set(ids.ravel().tolist()) == played.expected_valid(replay.rows), steps
        oldest = played.rows_added - replay.rows
        skipped = {i for i, r in played.row.items() if r >= oldest} - played.expected_valid(replay.rows)
        assert skipped or steps == 20, "the oldest rows continuing an evicted episode are not sampled"


def test_sequences_never_span_the_cursor_and_restart_stacks_at_is_first() -> None:
    replay, played = filled(rows=20, steps=57, max_length=8)
    seq = replay.sample_sequences(300, 10)
    ids = check_stacks(played, seq)
    assert np.all(np.diff(ids, axis=1) == replay.streams)  # consecutive steps of one stream
    assert seq["is_first"][:, 0].all()
    starts = seq["is_first"][:, 1:]
    assert starts.any()
    restarted = seq["obs"][:, 1:][starts]  # (n, 4, 8, 8): reset padding, one frame four times
    assert all(np.array_equal(s[0], f) for s in restarted for f in s)
    assert not np.array_equal(restarted[:, 0], seq["next_obs"][:, :-1][starts][:, -1])  # nothing carried over


def test_a_wrapped_start_ring_drops_only_the_first_rows_it_no_longer_holds() -> None:
    # One-step episodes: every row starts a context, so the start ring (16 frames) wraps first.
    replay, played = filled(rows=20, steps=40, max_length=1, start_fraction=0.0)
    assert replay.start_slots == 16 and replay.start_written > 16
    ids = check_stacks(played, replay.sample(8, 256))
    assert 0 < len(set(ids.ravel().tolist())) < len(played.expected_valid(replay.rows))


def test_sampling_is_refused_when_no_stack_is_complete() -> None:
    replay, _ = filled(rows=20, steps=40, max_length=1, start_fraction=0.0)
    replay.start_written += 10 * replay.start_slots  # every start frame overwritten
    with pytest.raises(ValueError, match="no transition"):
        replay.sample(1, 4)
    with pytest.raises(ValueError, match="empty"):
        FrameReplay(40, 2, ACT, seed=0, frame_shape=FRAME).sample(1, 1)


# ---------------------------------------------------------------- MEMORY.md rule 2: samples own their memory


def storage_arrays(replay: FrameReplay) -> list[np.ndarray]:
    return list(replay.data.values())


def test_samples_and_sequences_own_their_memory() -> None:
    replay, _ = filled()
    for sample in (replay.sample(4, 16), replay.sample_sequences(5, 6)):
        for name, array in sample.items():
            assert array.flags.owndata and array.base is None, name
            assert not any(np.shares_memory(array, s) for s in storage_arrays(replay)), name


def test_a_held_sample_does_not_change_when_the_buffer_wraps() -> None:
    replay, played = filled(rows=20, steps=25)
    sample, seq = replay.sample(2, 32), replay.sample_sequences(4, 8)
    kept = {name: a.copy() for name, a in (sample | {f"seq_{k}": v for k, v in seq.items()}).items()}
    play([stacked() for _ in range(2)], replay, 45, played, seed=100)  # overwrite every row twice
    for name, array in (sample | {f"seq_{k}": v for k, v in seq.items()}).items():
        np.testing.assert_array_equal(array, kept[name], err_msg=name)


def test_held_samples_do_not_keep_storage_alive() -> None:
    replay, _ = filled()
    samples = [replay.sample(4, 16) for _ in range(10)] + [replay.sample_sequences(3, 5)]
    assert evicted_alive_bytes(replay.data, {}) == 0
    storage = [weakref.ref(array) for array in storage_arrays(replay)]
    del replay
    gc.collect()
    assert all(ref() is None for ref in storage), "a held sample keeps the storage alive"
    assert samples[0]["obs"].shape == (4, 16, 4, *FRAME)


# ---------------------------------------------------------------- checkpoint state


def complete(blobs: dict[str, bytes | None]) -> dict[str, bytes]:
    assert all(blob is not None for blob in blobs.values())
    return {name: blob for name, blob in blobs.items() if blob is not None}


def test_state_round_trip_is_bit_exact_and_resumes_the_same() -> None:
    original, played = filled(rows=20, steps=33)
    original.sample(2, 5)  # advance the rng
    blobs, meta = original.state()
    meta = json.loads(json.dumps(meta))  # it is stored as JSON
    assert any(name.startswith("replay/starts/") for name in blobs)
    copy = FrameReplay(40, 2, ACT, seed=99, frame_shape=FRAME)
    copy.load_state(complete(blobs), meta)
    for name, array in original.data.items():
        np.testing.assert_array_equal(copy.data[name], array, err_msg=name)
    assert (copy.cursor, copy.filled_rows, copy.start_written) == (
        original.cursor,
        original.filled_rows,
        original.start_written,
    )
    for _ in range(2):
        a, b = original.sample(3, 9), copy.sample(3, 9)
        c, d = original.sample_sequences(4, 6), copy.sample_sequences(4, 6)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        for name in FIELDS:
            np.testing.assert_array_equal(c[name], d[name])
    for replay in (original, copy):  # both continue the same way, contexts included
        play([stacked() for _ in range(2)], replay, 7, Played(), seed=5)
    for name, array in original.data.items():
        np.testing.assert_array_equal(copy.data[name], array, err_msg=name)


def test_only_shards_written_since_the_last_save_are_handed_out() -> None:
    row_bytes = 2 * (64 + 12 + 4 + 3 + 1 + 32)  # frame, action, reward, 3 flags, age, start serials; 2 streams
    replay = FrameReplay(40, 2, ACT, seed=0, frame_shape=FRAME, shard_mb=5 * row_bytes / 2**20)
    assert replay.shard_rows == 5 and replay.row_bytes == row_bytes
    play([stacked() for _ in range(2)], replay, 20, Played())
    replay.mark_saved()
    assert all(blob is None for blob in replay.state()[0].values())
    written = replay.start_written
    play([stacked() for _ in range(2)], replay, 1, Played(), seed=9)  # row 0 overwritten, new start frames
    changed = sorted(name for name, blob in replay.state()[0].items() if blob is not None)
    slots = {(serial % replay.start_slots) // replay.shard_slots for serial in range(written, replay.start_written)}
    assert changed == ["replay/00000"] + [f"replay/starts/{index:05d}" for index in sorted(slots)]


def test_load_state_refuses_another_layout_or_a_damaged_shard() -> None:
    replay, _ = filled()
    blobs, meta = replay.state()
    with pytest.raises(ValueError, match="do(es)? not match"):
        FrameReplay(80, 2, ACT, seed=0, frame_shape=FRAME).load_state(complete(blobs), meta)
    with pytest.raises(ValueError, match="do(es)? not match"):
        FrameReplay(40, 2, ACT, seed=0, frame_shape=(8, 9)).load_state(complete(blobs), meta)
    flat_blobs, flat_meta = ReplayBuffer(40, 2, 3, ACT, seed=0).state()
    with pytest.raises(ValueError, match="do(es)? not match"):
        FrameReplay(40, 2, ACT, seed=0, frame_shape=FRAME).load_state(complete(flat_blobs), flat_meta)
    damaged = {name: blob[:-1] for name, blob in complete(blobs).items()}
    with pytest.raises(ValueError, match="holds .* bytes, expected"):
        FrameReplay(40, 2, ACT, seed=0, frame_shape=FRAME).load_state(damaged, meta)


# ---------------------------------------------------------------- size, input checks, choosing a replay


def test_bytes_per_transition_for_the_pong_shape() -> None:
    replay = FrameReplay(50_000, 32, 6, seed=0)  # the incident: 84x84 frames, stacks of 4, capacity 50,000
    frame = 84 * 84
    per_transition = replay.bytes_per_transition
    assert per_transition == replay.nbytes / replay.capacity
    assert per_transition <= 1.2 * frame, per_transition / frame
    assert 2 * 4 * frame / per_transition >= 6  # stacked obs and next_obs, even as uint8
    assert replay.filled_bytes == 0


def test_a_frame_replay_larger_than_available_ram_gets_a_clear_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.replay

    class Tiny:
        available = 2**20

    monkeypatch.setattr(training.replay.psutil, "virtual_memory", lambda: Tiny())
    with pytest.warns(UserWarning, match=r"replay buffer needs .* lower replay.capacity"):
        FrameReplay(400, 2, ACT, seed=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dtype", r"obs of shape \(2, 4, 8, 8\) float32; the frame replay takes \(2, 4, 8, 8\) uint8"),
        ("shape", r"next_obs of shape \(2, 3, 8, 8\) uint8"),
        ("shift", "stream 1: next_obs is not obs shifted by one frame"),
    ],
)
def test_add_refuses_what_is_not_a_frame_stack(change: str, message: str) -> None:
    replay = FrameReplay(40, 2, ACT, seed=0, frame_shape=FRAME)
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, *FRAME), dtype=np.uint8)
    obs, nxt = frames[:, :4], frames[:, 1:]
    if change == "dtype":
        obs = obs.astype(np.float32)
    elif change == "shape":
        nxt = nxt[:, 1:]
    else:
        nxt = nxt.copy()
        nxt[1, 0] += 1
    no = np.zeros(2, np.bool_)
    with pytest.raises(ValueError, match=message):
        replay.add(Transitions(obs, np.zeros((2, ACT), np.float32), np.zeros(2, np.float32), nxt, no, no, no))


def test_a_ring_too_short_for_one_stack_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 4 rows"):
        FrameReplay(8, 2, ACT, seed=0)
    with pytest.raises(ValueError, match="smaller than"):
        FrameReplay(1, 2, ACT, seed=0)


def test_make_replay_picks_the_replay_from_the_observation_shape() -> None:
    make: Callable[..., ReplayBuffer | FrameReplay] = make_replay
    assert type(make(100, 2, (3,), np.float32, 1, 0)) is ReplayBuffer
    frames = make(100, 2, (4, 84, 84), np.uint8, 6, 0)
    assert type(frames) is FrameReplay and frames.stack == 4 and frames.frame_shape == (84, 84)
    with pytest.raises(ValueError, match=r"no replay for observations of shape \(4, 84, 84\) float32"):
        make(100, 2, (4, 84, 84), np.float32, 6, 0)
