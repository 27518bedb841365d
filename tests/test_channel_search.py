"""The channel search: ordering channels, pruning to a cost, tracking removals across steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


def _group(name, size, producers=None, prunable=True):
    producers = producers or (name,)
    return SimpleNamespace(
        name=name, size=size, producers=producers, prunable=prunable, reason=None if prunable else "blocked",
        indices={p: np.arange(size) for p in producers}, output_indices={p: np.arange(size) for p in producers},
    )


def test_removal_order_is_global_least_important_first_within_caps():
    from compressor.search.channels import removal_order

    groups = [_group("a", 4), _group("b", 4)]
    scores = {"a": np.array([0.1, 2.0, 0.3, 1.6]), "b": np.array([0.2, 0.05, 1.0, 2.75])}
    # Cap 0.5: at most 2 of 4 channels per group.
    assert removal_order(groups, scores, 0.5) == [("b", 1), ("a", 0), ("b", 0), ("a", 2)]
    # Cap 0.9 of 4 is 3; a group always keeps one channel.
    order = removal_order(groups, scores, 0.99)
    assert sum(1 for name, _ in order if name == "a") == 3
    # Caps count what earlier steps removed: "a" had 6 channels, 2 went already; half of 6 leaves 1 more.
    order = removal_order(groups, scores, 0.5, original_sizes={"a": 6, "b": 4})
    assert [name for name, _ in order].count("a") == 1 and [name for name, _ in order].count("b") == 2
    order = removal_order(groups, scores, 0.5, original_sizes={"a": 12, "b": 4})  # 8 of 12 gone: cap 6 - 8 < 0
    assert [name for name, _ in order].count("a") == 0


def test_removals_of_takes_a_prefix_sorted_per_group():
    from compressor.search.channels import removals_of

    order = [("b", 3), ("a", 0), ("b", 1)]
    assert removals_of(order, 3) == {"a": [0], "b": [1, 3]}
    assert removals_of(order, 0) == {}


def test_tracker_maps_removals_of_later_steps_back_to_original_channels():
    from compressor.search.channel_search import RemovalTracker

    tracker = RemovalTracker([_group("a", 6)])
    tracker.remove([_group("a", 6)], {"a": [1, 4]})  # original 1, 4 go; 0, 2, 3, 5 remain
    tracker.remove([_group("a", 4)], {"a": [2]})  # position 2 of what remains is original 3
    (removal,) = tracker.original_removals("magnitude")
    assert removal.remove == (1, 3, 4) and removal.size == 6


def test_settings_are_validated():
    from compressor.errors import CompressorError
    from compressor.search.channel_search import ChannelSettings

    with pytest.raises(CompressorError, match="Invalid criterion"):
        ChannelSettings(criterion="random")
    with pytest.raises(CompressorError, match="Invalid max_fraction"):
        ChannelSettings(max_fraction=1.0)
    with pytest.raises(CompressorError, match="Invalid step"):
        ChannelSettings(step=0.0)
    for chance in (0.0, 1.0, 1.5):
        with pytest.raises(CompressorError, match="Invalid guard_chance"):
            ChannelSettings(guard_chance=chance)


def _scripted_search(monkeypatch, accuracies, deadline=None, judge=None, accept=None, limit=0.02, **settings):
    """search_channels under a budget of `limit` (2 points) on a tiny CNN, its step accuracies scripted in order.

    With `deadline`, the search's clock starts at 0 and each fine-tuning run takes 60 s of it.
    """
    import keras

    from compressor.finetune import FinetuneConfig
    from compressor.io.data import Dataset
    from compressor.search import channel_search
    from compressor.search.budgets import Budget

    keras.utils.set_random_seed(0)  # the cuts follow the weights' magnitudes
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    rng = np.random.default_rng(0)
    data = Dataset(rng.normal(size=(200, 8, 8, 1)).astype("float32"), np.zeros(200, np.int64), "scripted")
    # The baseline is measured first (accuracy 0.9); each later measurement takes the next scripted accuracy.
    script = iter([0.9, *accuracies])
    runs = []

    def correct(self, model):
        share = next(script)
        return np.arange(200) < round(share * 200)

    clock = [0.0]

    def finetune(self, candidate, target_accuracy, run=0):
        runs.append(run)
        clock[0] += 60.0
        return 1

    monkeypatch.setattr(channel_search._Run, "_correct", correct)
    monkeypatch.setattr(channel_search._Run, "_finetune", finetune)
    if deadline is not None:
        monkeypatch.setattr(channel_search, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    settings = channel_search.ChannelSettings(finetune=FinetuneConfig(epochs=1), step=0.5, **settings)
    result = channel_search.search_channels(model, Budget("accuracy_drop", limit), settings, data, data, deadline=deadline,
                                            judge=judge, accept=accept)
    return result, runs


def test_a_step_that_misses_within_the_budget_is_fine_tuned_once_more(monkeypatch):
    # MARGIN x 2 points = 1.5 points hold; step 1 loses 1.0 (holds), step 2 loses 2.0: within the
    # budget but not the margin, so it is fine-tuned again (run 1), then loses 1.0 and holds.
    # Then two smaller steps lose 5 points each (beyond the budget: no second run) and the search stops.
    result, runs = _scripted_search(monkeypatch, [0.89, 0.88, 0.89, 0.85, 0.85, 0.85])
    assert runs == [0, 0, 1, 0, 0, 0]
    assert [step.accepted for step in result.steps] == [True, True, False, False, False]
    assert result.steps[1].epochs == 2 and result.steps[1].accuracy == pytest.approx(0.89)


def test_with_a_guard_a_step_at_the_edge_of_its_expected_bound_is_fine_tuned_once_more(monkeypatch):
    # 200 search samples, a guard of 6,000. Losing 3 of them (1.5 points) gives an expected guard
    # bound of about 1.8 points: within 2, but the guard would accept it only about 60% of the
    # time (guard_chance), under GUARD_CHANCE; so it is fine-tuned again, then loses 2 (1 point,
    # chance about 0.85) and holds. Three more steps lose 5 points each and the search stops.
    from compressor.search.channel_search import GUARD_CHANCE
    from compressor.search.confidence import guard_chance, paired_drop

    baseline = np.arange(200) < 180
    edge = paired_drop(baseline, np.arange(200) < 177)
    assert 0.5 < guard_chance(edge, 6000, 0.02) < GUARD_CHANCE <= guard_chance(paired_drop(baseline, np.arange(200) < 178), 6000, 0.02)
    result, runs = _scripted_search(monkeypatch, [0.885, 0.89, 0.85, 0.85, 0.85], confidence=0.95, guard_samples=6000)
    assert runs == [0, 1, 0, 0, 0]
    assert [step.accepted for step in result.steps] == [True, False, False, False]
    assert result.steps[0].epochs == 2


def test_a_higher_guard_chance_shows_the_guard_only_safer_steps(monkeypatch):
    # Losing 2 of 200 search samples (1 point) gives a 6,000-image guard about a 0.86 chance to
    # accept: enough for the default 0.8, so the first step holds at once; not for 0.95, so it is
    # fine-tuned again and holds only when it then loses 1 (chance above 0.99).
    from compressor.search.channel_search import GUARD_CHANCE

    script = [0.89, 0.895, 0.85, 0.85, 0.85]
    default, default_runs = _scripted_search(monkeypatch, script, confidence=0.95, guard_samples=6000)
    assert GUARD_CHANCE == 0.8 and default_runs[:2] == [0, 0]
    assert default.steps[0].accepted and default.steps[0].epochs == 1
    assert default.steps[0].accuracy == pytest.approx(0.89)
    safer, safer_runs = _scripted_search(monkeypatch, script, confidence=0.95, guard_samples=6000, guard_chance=0.95)
    assert safer_runs[:2] == [0, 1]
    assert safer.steps[0].accepted and safer.steps[0].epochs == 2
    assert safer.steps[0].accuracy == pytest.approx(0.895)


def _guard_accepting_all():
    """(the labels shown, a guard that records each step it is shown and accepts it)."""
    shown = []

    def accept(what, candidate):
        shown.append(what)
        return True

    return shown, accept


def test_a_step_the_guard_would_accept_only_likely_is_fine_tuned_once_more_before_it_sees_it(monkeypatch):
    # Losing 2 of 200 search samples (1 point) holds under the default 0.8 (a 6,000-image guard's
    # chance is about 0.86) but is below SURE_CHANCE: with a guard to show it to, the step is
    # fine-tuned again first and the guard sees it as it then measures (1 sample lost).
    from compressor.search.channel_search import GUARD_CHANCE, SURE_CHANCE
    from compressor.search.confidence import guard_chance, paired_drop

    baseline = np.arange(200) < 180
    assert GUARD_CHANCE <= guard_chance(paired_drop(baseline, np.arange(200) < 178), 6000, 0.02) < SURE_CHANCE
    shown, accept = _guard_accepting_all()
    script = [0.89, 0.895, 0.85, 0.85, 0.85]
    result, runs = _scripted_search(monkeypatch, script, accept=accept, confidence=0.95, guard_samples=6000)
    assert runs[:2] == [0, 1] and len(shown) == 1
    assert result.steps[0].accepted and result.steps[0].epochs == 2
    assert result.steps[0].accuracy == pytest.approx(0.895)
    # The record keeps the chance of its first check: why it was fine-tuned again.
    assert GUARD_CHANCE <= result.steps[0].guard_chance < SURE_CHANCE
    assert result.to_dict()["steps"][0]["guard_chance"] == result.steps[0].guard_chance
    # Without a guard nothing irrevocable follows a step: it is kept as it first held.
    unguarded, unguarded_runs = _scripted_search(monkeypatch, script, confidence=0.95, guard_samples=6000)
    assert unguarded_runs[:2] == [0, 0] and unguarded.steps[0].epochs == 1
    assert unguarded.steps[0].guard_chance is None


def test_a_step_that_held_only_after_its_second_run_is_made_sure_by_a_third_before_the_guard_sees_it(monkeypatch):
    # Losing 3 of 200 (chance about 0.6) misses within the budget; the second run loses 2: it holds
    # (about 0.86) but below SURE_CHANCE, so a third run follows, loses 1, and the guard sees that.
    # STEP_RUNS caps the runs: had the second run still missed by a little and the third only
    # brought it to an unsure hold, the guard would see it there, after three runs.
    from compressor.search.channel_search import STEP_RUNS

    shown, accept = _guard_accepting_all()
    guarded = dict(accept=accept, confidence=0.95, guard_samples=6000)
    result, runs = _scripted_search(monkeypatch, [0.885, 0.89, 0.895, 0.85, 0.85, 0.85], **guarded)
    assert STEP_RUNS == 3 and runs[:3] == [0, 1, 2] and len(shown) == 1
    assert result.steps[0].accepted and result.steps[0].epochs == 3
    assert result.steps[0].accuracy == pytest.approx(0.895)
    shown.clear()
    capped, capped_runs = _scripted_search(monkeypatch, [0.88, 0.885, 0.89, 0.85, 0.85, 0.85], **guarded)
    assert capped_runs[:4] == [0, 1, 2, 0] and len(shown) == 1
    assert capped.steps[0].accepted and capped.steps[0].epochs == 3
    assert capped.steps[0].accuracy == pytest.approx(0.89)


def test_a_step_whose_extra_run_measures_worse_is_shown_to_the_guard_as_it_held(monkeypatch):
    # The step held (1 point lost), was fine-tuned once more, then lost 2 points: the extra run
    # does not turn a step that held into a miss; its weights go back and the guard sees it as it held.
    from compressor.search import channel_search

    restored = []
    set_weights = channel_search.keras.Model.set_weights
    monkeypatch.setattr(channel_search.keras.Model, "set_weights",
                        lambda self, weights: restored.append(self.name) or set_weights(self, weights))
    shown, accept = _guard_accepting_all()
    result, runs = _scripted_search(monkeypatch, [0.89, 0.88, 0.85, 0.85, 0.85], accept=accept, confidence=0.95,
                                    guard_samples=6000)
    assert runs[:2] == [0, 1] and len(shown) == 1 and len(restored) == 1
    assert result.steps[0].accepted and result.steps[0].epochs == 2
    assert result.steps[0].accuracy == pytest.approx(0.89)
    assert result.flops == result.steps[0].flops < result.baseline_flops


def test_a_step_without_time_for_its_extra_run_is_shown_to_the_guard_as_it_held(monkeypatch):
    # Step 1 holds at 60 s of 100 with a chance below SURE_CHANCE; its extra run would take 60 s and
    # 40 are left, so the guard sees it as it is (not a miss), and then the time limit stops the search.
    shown, accept = _guard_accepting_all()
    result, runs = _scripted_search(monkeypatch, [0.89, 0.89], deadline=100.0, accept=accept, confidence=0.95,
                                    guard_samples=6000)
    assert runs == [0] and len(shown) == 1
    assert [step.accepted for step in result.steps] == [True] and result.steps[0].epochs == 1
    assert result.stopped == "time limit"


def test_with_a_judge_steps_are_checked_on_the_judged_file_against_the_keras_original(monkeypatch):
    # In Keras every step would lose 1 point and hold; the judged (quantized) file of each loses
    # 1 point more, 2 in all: within the budget but over MARGIN, so each step is fine-tuned again,
    # still misses, and is retried smaller until the misses end the steps; the smallest miss's
    # recovery run gains nothing, and the search ends with nothing kept.
    judged = []

    def judge(model, data):
        judged.append(model)
        return np.arange(len(data)) < round(0.88 * len(data))

    result, runs = _scripted_search(monkeypatch, [0.89] * 5, judge=judge)
    assert runs == [0, 1, 0, 1, 0, 1, 3]
    assert [step.accepted for step in result.steps] == [False] * 4
    assert [step.accuracy for step in result.steps] == pytest.approx([0.88] * 4)  # the judged file's
    assert [step.recovery for step in result.steps] == [0, 0, 0, 1]
    assert len(judged) == 7 and result.flops == result.baseline_flops
    assert result.baseline_accuracy == pytest.approx(0.9)  # the original, measured in Keras
    # The same steps without a judge hold at once.
    plain, plain_runs = _scripted_search(monkeypatch, [0.89] * 5)
    assert plain.steps[0].accepted and plain_runs[0] == 0


def test_a_step_still_missing_after_its_second_run_is_retried_smaller(monkeypatch):
    # Then its recovery run (the first step: the only miss within the budget) gains nothing.
    result, runs = _scripted_search(monkeypatch, [0.88, 0.882, 0.85, 0.85, 0.882])
    assert runs == [0, 1, 0, 0, 3]
    assert [step.accepted for step in result.steps] == [False] * 4
    assert result.steps[1].target > result.steps[0].target  # the retry keeps more of the cost
    assert result.steps[3].flops == result.steps[0].flops and result.steps[3].recovery == 1
    assert result.flops == result.baseline_flops


def test_after_the_last_miss_a_step_that_missed_within_the_budget_is_recovered_and_the_search_goes_on(monkeypatch):
    # At 3 points, with 200 samples against a baseline of 180 right: a step holds from 176 right
    # (MARGIN: 2.25 points), is within the budget from 174. Step 1 keeps 174 after its second run
    # and misses; steps 2 and 3 miss by far. Step 1's recovery runs then gain a sample (175), then
    # hold (176): the guard sees it, it is kept, and the steps go on from it until they miss by far.
    shown, accept = _guard_accepting_all()
    script = [0.87, 0.87, 0.85, 0.85, 0.875, 0.88, *[0.85] * 6]
    result, runs = _scripted_search(monkeypatch, script, accept=accept, limit=0.03)
    assert runs[:6] == [0, 1, 0, 0, 3, 4] and all(run == 0 for run in runs[6:])
    assert [step.accepted for step in result.steps[:4]] == [False, False, False, True]
    recovered = result.steps[3]
    assert recovered.recovery == 2 and recovered.epochs == 2 and recovered.accuracy == pytest.approx(0.88)
    assert recovered.flops == result.steps[0].flops and recovered.target == result.steps[0].target
    assert len(shown) == 1 and result.flops == recovered.flops < result.baseline_flops
    assert not any(step.accepted for step in result.steps[4:]) and result.stopped is None
    assert result.to_dict()["steps"][3]["recovery"] == 2


def test_recovery_takes_the_smallest_miss_within_the_budget_and_ends_when_a_run_gains_nothing(monkeypatch):
    # Step 1 misses by far (not recovered); steps 2 and 3 miss within the budget after two runs each.
    # Step 2 cut more: it gets the recovery run, which gains nothing, and nothing is kept.
    result, runs = _scripted_search(monkeypatch, [0.85, 0.87, 0.87, 0.87, 0.87, 0.87], limit=0.03)
    assert runs == [0, 0, 1, 0, 1, 3]
    assert result.steps[1].flops < result.steps[2].flops
    assert [step.recovery for step in result.steps] == [0, 0, 0, 1] and not any(step.accepted for step in result.steps)
    assert result.steps[3].flops == result.steps[1].flops and result.flops == result.baseline_flops


def test_a_recovery_that_fails_records_the_guard_chance_of_its_best_run(monkeypatch):
    # As above, with a guard: the record of the recovery that gained nothing carries the chance its
    # best measurement gives, as every other step's record does.
    shown, accept = _guard_accepting_all()
    result, runs = _scripted_search(monkeypatch, [0.85, 0.87, 0.87, 0.87, 0.87, 0.87], limit=0.03, accept=accept,
                                    confidence=0.95, guard_samples=6000)
    assert runs == [0, 0, 1, 0, 1, 3] and not shown
    failed = result.steps[-1]
    assert failed.recovery == 1 and not failed.accepted
    assert failed.guard_chance is not None and 0.0 <= failed.guard_chance < 0.5  # 3 points lost on 200: at the limit


def test_recovery_runs_stop_at_their_cap_and_at_the_deadline(monkeypatch):
    # At 10 points a step holds from 166 of 200 right (MARGIN: 7.5 points), is within the budget from
    # 160. Step 1 keeps 160 after two runs; steps 2 and 3 miss by far; each recovery run gains a
    # sample and none holds: RECOVERY_RUNS of them, then the search ends with nothing kept.
    from compressor.search.channel_search import RECOVERY_RUNS

    script = [0.8, 0.8, 0.7, 0.7, 0.805, 0.81, 0.815, 0.82, 0.825]
    result, runs = _scripted_search(monkeypatch, script, limit=0.1)
    assert RECOVERY_RUNS == 4 and runs == [0, 1, 0, 0, 3, 4, 5, 6]
    assert result.steps[-1].recovery == 4 and result.steps[-1].accuracy == pytest.approx(0.82)
    assert result.flops == result.baseline_flops
    # Each run takes 60 s: at 240 s of 370 two runs fit (each begins with more than step 1's first
    # pass left, 60 s), the third would not.
    timed, timed_runs = _scripted_search(monkeypatch, script, deadline=370.0, limit=0.1)
    assert timed_runs == [0, 1, 0, 0, 3, 4] and timed.steps[-1].recovery == 2


def test_misses_count_in_all_and_the_step_never_grows_back(monkeypatch):
    # Step 1 (half the cost) loses 5 points: retried at sqrt(0.5) of the cost, which holds and is kept.
    # The next steps stay at that size or smaller (0.71, then 0.84 of the kept cost); the third miss
    # in all (RETRIES + 1) ends the search, although a step was kept between them.
    result, runs = _scripted_search(monkeypatch, [0.85, 0.89, 0.85, 0.85, 0.85])
    assert [step.accepted for step in result.steps] == [False, True, False, False]
    kept = result.steps[1].flops / result.baseline_flops  # what the kept step reached
    later = [step.target / kept for step in result.steps[2:]]  # each aim as a fraction of it
    assert later == pytest.approx([0.5 ** 0.5, 0.5 ** 0.25], rel=0.01)


def test_a_smaller_step_that_cuts_the_same_channels_is_not_fine_tuned_again(monkeypatch):
    from compressor.search import channel_search

    cut = channel_search._Run._cut
    first = []

    def same_cut(self, model, groups, aim):
        # Every step cuts what the first one cut, whatever it aims at.
        first.append(first[0] if first else cut(self, model, groups, aim))
        return first[-1]

    monkeypatch.setattr(channel_search._Run, "_cut", same_cut)
    result, runs = _scripted_search(monkeypatch, [0.85])
    assert runs == [0] and len(result.steps) == 1 and not result.steps[0].accepted
    assert len(first) == 1 + channel_search.RETRIES  # the retries were cut, found the same, and skipped


def test_no_step_begins_that_would_end_after_the_deadline(monkeypatch):
    # Each fine-tuning run takes 60 s. With 150 s: step 1 ends at 60 (90 s left, more than its 60),
    # step 2 at 120 (30 s left, less than the longest step): the search stops with both kept.
    result, runs = _scripted_search(monkeypatch, [0.89, 0.89, 0.89, 0.89], deadline=150.0)
    assert runs == [0, 0]
    assert [step.accepted for step in result.steps] == [True, True]
    assert [step.seconds for step in result.steps] == [60.0, 60.0]
    assert result.stopped == "time limit" and result.to_dict()["stopped"] == "time limit"
    assert result.flops == result.steps[-1].flops < result.baseline_flops


def test_a_step_fine_tuned_twice_is_expected_to_take_one_run_next_time(monkeypatch):
    # Step 1 misses within the budget and is fine-tuned twice (120 s), then holds. At 120 s of 230,
    # 110 s are left: more than a step takes up to its first check (60 s), so step 2 begins and
    # holds at 180 s; 50 s are left, less than a run, and the search stops.
    result, runs = _scripted_search(monkeypatch, [0.88, 0.89, 0.89], deadline=230.0)
    assert runs == [0, 1, 0]
    assert [step.accepted for step in result.steps] == [True, True]
    assert [step.seconds for step in result.steps] == [120.0, 60.0]
    assert result.stopped == "time limit"


def test_a_second_fine_tuning_run_that_would_end_after_the_deadline_does_not_begin(monkeypatch):
    # Step 1 misses within the budget at 60 s of 100: its second run would take as long as its
    # first pass (60 s) and only 40 s are left, so the step counts as missed and nothing is kept.
    result, runs = _scripted_search(monkeypatch, [0.88], deadline=100.0)
    assert runs == [0]
    assert [step.accepted for step in result.steps] == [False] and result.steps[0].epochs == 1
    assert result.stopped == "time limit" and result.flops == result.baseline_flops


def test_without_a_deadline_or_before_it_the_search_ends_on_its_own(monkeypatch):
    result, runs = _scripted_search(monkeypatch, [0.89, 0.85, 0.85, 0.85])
    assert result.stopped is None and result.to_dict()["stopped"] is None
    late, late_runs = _scripted_search(monkeypatch, [0.89, 0.85, 0.85, 0.85], deadline=10_000.0)
    assert late.stopped is None and late_runs == runs
    assert [step.flops for step in late.steps] == [step.flops for step in result.steps]


def test_a_step_the_guard_rejects_ends_the_search_and_its_record_says_so(monkeypatch):
    # Every step would hold on the search data; the guard accepts the first and rejects the second.
    looks = []

    def accept(what, candidate):
        looks.append(what)
        return len(looks) == 1

    result, runs = _scripted_search(monkeypatch, [0.89, 0.89, 0.89, 0.89], accept=accept)
    assert runs == [0, 0] and len(looks) == 2
    assert [step.accepted for step in result.steps] == [True, False]
    assert result.stopped == "guard" and result.to_dict()["stopped"] == "guard"
    assert result.flops == result.steps[0].flops > result.steps[1].flops


def test_a_deadline_already_passed_takes_no_step(monkeypatch):
    result, runs = _scripted_search(monkeypatch, [], deadline=0.0)
    assert runs == [] and result.steps == [] and result.stopped == "time limit"
    assert result.flops == result.baseline_flops
