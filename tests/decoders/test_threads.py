"""Adaptive threads (runner.decoders.threads): the controller against a fake clock whose step
times depend on the thread count, and greedy outputs unchanged when it switches counts for real."""
from __future__ import annotations

import random

import pytest
import torch

from runner import generate, pipeline, recipes
from runner.decoders import threads
from runner.decoders.threads import MAX_PERIOD, PROBE_SHARE, AdaptiveThreads, candidates
from runner.kernels import MAX_ROWS

DECODE = torch.zeros(1, 1, dtype=torch.long)
PROMPT = torch.zeros(1, MAX_ROWS + 1, dtype=torch.long)
SHORT_PROMPT = torch.zeros(1, 5, dtype=torch.long)  # a prefill when only its last logits are asked for


class FakeMachine:
    """A clock, torch's thread setting and a forward whose step takes cost[count] seconds (give
    or take `noise`); cost can be changed between steps (load comes and goes)."""

    def __init__(self, cost: dict[int, float], noise: float = 0.05, seed: int = 0):
        self.cost, self.noise = cost, noise
        self.after_prompt = 1.0  # the first decode step after a prompt costs this many times more
        self.steps_since_prompt = 0
        self.payback = 0.0  # a step after one at more threads costs this many steps more
        self.now, self.threads = 0.0, max(cost)
        self.random = random.Random(seed)
        self.sets: list[int] = []  # every count set, in order
        self.steps: list[int] = []  # the count each decode-shaped call ran at
        self.prompts: list[int] = []  # the count each prompt-shaped call ran at

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        assert n != self.threads, "torch's count is set only when it changes"
        self.threads = n
        self.sets.append(n)

    def get_threads(self) -> int:
        return self.threads

    def forward(self, tokens, input_pos, last_only=False):
        prompt = tokens.numel() > MAX_ROWS or (last_only and tokens.shape[-1] > 1)
        first = not prompt and self.prompts and self.steps_since_prompt == 0
        after_more = not prompt and self.steps and self.steps[-1] > self.threads
        (self.prompts if prompt else self.steps).append(self.threads)
        self.steps_since_prompt = 0 if prompt else self.steps_since_prompt + 1
        factor = (self.after_prompt if first else 1.0) + (self.payback if after_more else 0.0)
        self.now += factor * self.cost[self.threads] * self.random.uniform(1 - self.noise, 1 + self.noise)
        return tokens

    def controller(self) -> AdaptiveThreads:
        return AdaptiveThreads(self.forward, candidates(max(self.cost)), self.clock, self.set_threads,
                               self.get_threads)


def decode(controller: AdaptiveThreads, machine: FakeMachine, steps: int) -> list[int]:
    """The counts of `steps` decode steps."""
    start = len(machine.steps)
    for _ in range(steps):
        controller(DECODE, torch.zeros(1))
    return machine.steps[start:]


@pytest.mark.parametrize("n, expected", [(1, [1]), (2, [2, 1]), (3, [3, 2, 1]), (4, [4, 3, 2, 1]),
                                         (16, [16, 15, 8, 4, 2, 1]), (6, [6, 5, 3, 1])])
def test_candidates_are_the_cores_then_one_less_then_halves(n, expected):
    assert candidates(n) == expected


def test_one_count_leaves_the_forward_as_it_is():
    forward = FakeMachine({1: 1.0}).forward
    assert threads.adaptive(forward, 1) is forward
    assert isinstance(threads.adaptive(forward, 2), AdaptiveThreads)


@pytest.mark.parametrize("fastest", [4, 3, 2, 1])
def test_it_converges_to_the_fastest_count_and_then_rarely_probes(fastest):
    cost = {n: 1.0 + 0.3 * abs(n - fastest) for n in (4, 3, 2, 1)}
    machine = FakeMachine(cost)
    controller = machine.controller()
    decode(controller, machine, 100)
    assert controller.current == fastest
    sets = len(machine.sets)
    later = decode(controller, machine, 1000)
    probes = len(later) - later.count(fastest)
    assert probes <= 10  # they back off to one every MAX_PERIOD steps or so
    assert len(machine.sets) - sets == 2 * probes  # to the probe's count and back


def test_it_switches_when_load_appears_and_back_when_it_goes():
    quiet = {2: 1.0, 1: 1.6}
    loaded = {2: 17.0, 1: 1.1}  # one core taken: two threads wait for each other
    machine = FakeMachine(dict(quiet))
    controller = machine.controller()
    decode(controller, machine, 300)
    assert controller.current == 2
    machine.cost.update(loaded)
    steps = decode(controller, machine, 20)
    assert controller.current == 1 and steps[-10:] == [1] * 10  # a few slow steps, then one thread
    start = machine.now
    steps = decode(controller, machine, 2000)
    # Probes of the slow count are spaced out: they cost about PROBE_SHARE of the time at most.
    assert steps.count(2) * loaded[2] < 1.5 * PROBE_SHARE * (machine.now - start)
    machine.cost.update(quiet)
    steps = decode(controller, machine, 3000)
    assert controller.current == 2 and steps[-100:].count(2) >= 99


def test_probes_cost_at_most_about_their_share_under_bursty_load_and_payback():
    machine = FakeMachine({2: 1.6, 1: 1.0}, noise=0.0)  # under load: two threads slower
    controller = machine.controller()
    decode(controller, machine, 200)
    assert controller.current == 1
    machine.payback = 1.5  # the step after a probe of two is slower still: the other processes catch up
    start, ideal = machine.now, 0.0
    for step in range(3000):
        burst = 1.6 if step % 40 < 3 else 1.0  # other load comes and goes: each burst resets the period
        machine.cost = {2: 1.6 * burst, 1: burst}
        ideal += burst
        decode(controller, machine, 1)
    assert (machine.now - start) / ideal < 1 + 1.5 * PROBE_SHARE


def test_a_jump_of_the_current_count_resets_the_period():
    machine = FakeMachine({2: 1.0, 1: 1.5})
    controller = machine.controller()
    decode(controller, machine, 2000)
    assert controller.period == MAX_PERIOD
    machine.cost[2] = 3.0  # slower, yet faster than one thread would now be: it stays
    machine.cost[1] = 4.0
    decode(controller, machine, 10)
    assert controller.period < MAX_PERIOD and controller.current == 2


def test_prompt_shaped_calls_never_change_the_count_nor_count_as_steps():
    machine = FakeMachine({4: 1.0, 3: 2.0, 2: 3.0, 1: 4.0})
    controller = machine.controller()
    for i in range(400):
        sets = len(machine.sets)
        controller(PROMPT, torch.zeros(1))
        assert len(machine.sets) == sets  # a prompt runs at the count it finds, which is the current one
        assert machine.prompts[-1] == controller.current
        decode(controller, machine, 1 + i % 7)
    # Only decode-shaped calls were timed, but for the first after each prompt.
    assert controller.step == len(machine.steps) - len(machine.prompts)


@pytest.mark.parametrize("prompt, last_only", [(PROMPT, False), (SHORT_PROMPT, True)])
def test_the_slow_first_step_after_a_prompt_is_not_taken_for_load(prompt, last_only):
    machine = FakeMachine({2: 1.0, 1: 1.6})
    machine.after_prompt = 6.0  # the first step after a prompt takes this many times longer
    controller = machine.controller()
    for _ in range(10):
        controller(prompt, torch.zeros(1), last_only)
        decode(controller, machine, 20)
    assert controller.current == 2 and machine.steps.count(1) <= 10  # the probes only


def test_state_is_kept_across_generations():
    machine = FakeMachine({2: 5.0, 1: 1.0})
    controller = machine.controller()
    decode(controller, machine, 50)
    controller(PROMPT, torch.zeros(1))  # a new generation's prompt
    assert decode(controller, machine, 20).count(1) == 20  # it did not start over at two threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Switching:
    """A clock that makes the controller switch counts every few steps: each count in turn times
    fast, then slow."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the end of a call: how long it took depends on the phase
            phase = (self.calls // 16) % 2
            self.now += 1.0 if (torch.get_num_threads() == 2) == bool(phase) else 3.0
        return self.now


@pytest.mark.parametrize("overrides", [[], ["dtype=bfloat16"], ["draft.kind=ngram"]])
def test_greedy_outputs_are_the_same_with_the_controller_switching_counts(restore_threads,
                                                                         overrides):
    path = "recipes/tiny-random.yaml"
    common = ["generate.temperature=0", "generate.max_new_tokens=48", *overrides]
    outputs, counts = {}, []
    for threads_key in ("threads=1", "threads=2", "threads=null"):
        built = pipeline.build(recipes.load(path, common + [threads_key], check_files=True), path)
        if threads_key == "threads=null":
            def recorded(tokens, input_pos, last_only=False, forward=built.forward):
                counts.append(torch.get_num_threads())
                return forward(tokens, input_pos, last_only)

            built.decoder.forward = AdaptiveThreads(recorded, [2, 1], clock=Switching())
        prompt = generate.encode_prompt(built, path)
        outputs[threads_key] = [built.decoder.generate(prompt, 48)[0] for _ in range(2)]
    assert outputs["threads=null"] == outputs["threads=1"] == outputs["threads=2"]
    assert {1, 2} <= set(counts)  # it did run steps at both counts


def test_the_pipeline_adapts_threads_only_for_a_recipe_without_threads(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "default_count", lambda: 2)  # this session runs at one thread (conftest)
    path = "recipes/tiny-random.yaml"
    adaptive = pipeline.build(recipes.load(path, ["threads=null"], check_files=True), path)
    fixed = pipeline.build(recipes.load(path, ["threads=1"], check_files=True), path)
    assert isinstance(adaptive.decoder.forward, AdaptiveThreads) and adaptive.decoder.forward.counts == [2, 1]
    assert adaptive.forward is adaptive.model  # what the server's batches and warm-up use stays the model
    assert fixed.decoder.forward is fixed.model and torch.get_num_threads() == 1


def test_a_compiled_pipeline_keeps_its_thread_count(monkeypatch, restore_threads):
    """torch.compile guards a step on the thread count: switching counts would recompile it."""
    monkeypatch.setattr(threads, "default_count", lambda: 2)
    path = "recipes/tiny-random.yaml"
    monkeypatch.setattr(pipeline, "compiled_forward", lambda model, section, *args: model)  # no compiling here
    built = pipeline.build(recipes.load(path, ["threads=null", "compile.decode=true"], check_files=True), path)
    assert not isinstance(built.decoder.forward, AdaptiveThreads)
