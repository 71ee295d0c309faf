"""Step schedules and latent strengths (models/control_schedule.py) against hand computations
of the keyframe rules (docs/schedules.md), on a made-up linear percent -> sigma mapping."""
import pytest
import torch

from xctrl.models.control_schedule import (LINEAR, LatentStrengths, ScheduleError, StepKeyframe, StepSchedule,
                                           parse_strength_list, percent_of_sigma)
from xctrl.models.controlnet_xs import connection_weights

SIGMA_MAX = 10.0


def p2s(p):
    """Sigma falls linearly from 10 at 0 % to 0 at 100 % of sampling."""
    return SIGMA_MAX * (1.0 - p)


def run(schedule, sigmas, max_sigma=SIGMA_MAX, calls_per_step=1):
    cursor = schedule.cursor()
    out = []
    for s in sigmas:
        for _ in range(calls_per_step):  # cond and uncond calls of one step see the same sigma
            strength, _ = cursor.at(s, p2s, max_sigma)
        out.append(round(strength, 9))
    return out


STEPS = [10.0, 8.0, 6.0, 4.0, 2.0]  # progress 0, .2, .4, .6, .8


def test_hold_keyframes_switch_when_sigma_reaches_their_start():
    schedule = StepSchedule([StepKeyframe(0.0, 1.0), StepKeyframe(0.5, 0.3), StepKeyframe(0.7, 0.0)])
    # 0.5 starts at sigma 5 (first step at or below: 4.0), 0.7 at sigma 3 (2.0)
    assert run(schedule, STEPS, calls_per_step=2) == [1.0, 1.0, 1.0, 0.3, 0.0]


def test_before_the_first_keyframe_the_strength_is_one():
    assert run(StepSchedule([StepKeyframe(0.3, 0.5)]), STEPS) == [1.0, 1.0, 0.5, 0.5, 0.5]


def test_guaranteed_steps_hold_a_keyframe_past_later_starts():
    schedule = StepSchedule([StepKeyframe(0.0, 1.0, guarantee_steps=3), StepKeyframe(0.2, 0.5, guarantee_steps=0),
                             StepKeyframe(0.4, 0.25)])
    # keyframe 0 holds for 3 steps; then 0.2 (0 guaranteed steps) is passed over for 0.4
    assert run(schedule, STEPS) == [1.0, 1.0, 1.0, 0.25, 0.25]
    # one with guaranteed steps of its own is not passed over
    schedule = StepSchedule([StepKeyframe(0.0, 1.0, guarantee_steps=3), StepKeyframe(0.2, 0.5, guarantee_steps=1),
                             StepKeyframe(0.4, 0.25)])
    assert run(schedule, STEPS) == [1.0, 1.0, 1.0, 0.5, 0.25]


def test_a_keyframe_starting_before_a_partial_denoise_guarantees_nothing():
    schedule = StepSchedule([StepKeyframe(0.0, 1.0, guarantee_steps=5), StepKeyframe(0.5, 0.3)])
    assert run(schedule, [4.0, 3.0, 2.0], max_sigma=4.0) == [0.3, 0.3, 0.3]


def test_linear_interpolates_in_sampling_percent_to_the_next_keyframe():
    schedule = StepSchedule([StepKeyframe(0.0, 1.0, interpolation=LINEAR), StepKeyframe(0.5, 0.0)])
    # 1 -> 0 over progress 0 .. 0.5: 1 - 2p
    assert run(schedule, STEPS) == pytest.approx([1.0, 0.6, 0.2, 0.0, 0.0], abs=1e-6)


def test_a_new_run_starts_the_schedule_again():
    schedule = StepSchedule([StepKeyframe(0.0, 1.0), StepKeyframe(0.5, 0.3)])
    cursor = schedule.cursor()
    assert [cursor.at(s, p2s, SIGMA_MAX)[0] for s in (10.0, 4.0, 10.0, 8.0)] == [1.0, 0.3, 1.0, 1.0]


def test_percent_of_sigma_inverts_the_mapping():
    for p in (0.0, 0.123, 0.5, 0.99):
        assert percent_of_sigma(p2s(p), p2s) == pytest.approx(p, abs=1e-9)


def test_keyframe_latent_strengths_follow_the_active_keyframe():
    half = LatentStrengths.from_list([0.5])
    schedule = StepSchedule([StepKeyframe(0.0, 1.0), StepKeyframe(0.5, 1.0, latents=half), StepKeyframe(0.7, 0.2)])
    cursor = schedule.cursor()
    got = [cursor.at(s, p2s, SIGMA_MAX)[1] for s in STEPS]
    assert got == [None, None, None, half, half]  # inherited by the keyframe after it


@pytest.mark.parametrize("keyframes, says", [
    ([StepKeyframe(0.5, 1.0), StepKeyframe(0.2, 1.0)], "in order"),
    ([StepKeyframe(1.5, 1.0)], "outside 0..1"),
    ([StepKeyframe(0.0, 1.0, interpolation="cubic")], "interpolation"),
])
def test_bad_keyframes_are_refused_naming_the_node(keyframes, says):
    with pytest.raises(ScheduleError, match=says) as e:
        StepSchedule(keyframes, node="Apply X")
    assert "Apply X" in str(e.value)


def test_latent_strength_lists_one_for_all_or_one_per_latent():
    assert LatentStrengths.from_list([0.5]).for_latents([0, 1, 2], 3).tolist() == [0.5] * 3
    assert LatentStrengths.from_list([1.0, 0.5, 0.0]).for_latents([2, 0, 1], 3).tolist() == [0.0, 1.0, 0.5]
    with pytest.raises(ScheduleError, match="2 values but the latent batch has 3"):
        LatentStrengths.from_list([1.0, 0.5]).check(3, "Apply X")


def test_latent_keyframes_count_negative_indices_from_the_end_and_null_the_rest():
    kf = LatentStrengths(values={0: 0.9, -1: 0.2}, missing=0.0)
    assert kf.for_latents([0, 1, 2, 3], 4).tolist() == pytest.approx([0.9, 0.0, 0.0, 0.2])
    assert kf.for_latents([3, 4], 5).tolist() == pytest.approx([0.0, 0.2])  # a window of a 5-frame video


def test_strength_lists_parse_commas_spaces_and_lines():
    assert parse_strength_list("1, 0.5\n0.25  0") == [1.0, 0.5, 0.25, 0.0]
    with pytest.raises(ScheduleError, match="numbers"):
        parse_strength_list("1, x")


def test_xs_connection_weights_decay_away_from_the_middle():
    w = connection_weights(3, 0.5)
    # encoder 0..2: m^3, m^2, m^1; middle 1; decoder 0..2: m^1, m^2, m^3
    assert w == [0.125, 0.25, 0.5, 1.0, 0.5, 0.25, 0.125]
    assert connection_weights(3) == [1.0] * 7
    assert connection_weights(3, explicit=[0.3]) == [0.3] * 7
    with pytest.raises(ValueError, match="give 1 or 7"):
        connection_weights(3, explicit=[1, 2])
    assert torch.tensor(connection_weights(12, 0.9)).argmax() == 12
