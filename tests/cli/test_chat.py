"""`runner chat`: the history reaches the model, the cache kept across turns computes what a
fresh prefill computes, the history is trimmed (never a crash) near the cache's end, and the
session behaves as a terminal program (two turns, Ctrl-C mid-answer, Ctrl-D)."""
import sys
from pathlib import Path

import pexpect
import pytest

from runner import chat, pipeline
from runner.recipes import load as resolve

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = str(ROOT / "recipes" / "smollm2-135m.yaml")
TINY = str(ROOT / "recipes" / "tiny-random.yaml")
GREEDY = ["generate.temperature=0", "generate.max_new_tokens=24"]
TURNS = ["Please remember this secret word: banana.", "What was the secret word I told you?", "Spell it backwards."]


def conversation(recipe: str, *overrides: str, reuse: bool = True):
    built = pipeline.build(resolve(recipe, [*GREEDY, *overrides]), recipe)
    notes: list[str] = []
    talk = chat.Conversation(built, recipe, notes.append)
    prompts = []
    generate = built.decoder.generate

    def watched(ids, *args, **kwargs):
        prompts.append((len(ids), kwargs.get("cached", 0)))
        return generate(ids, *args, **kwargs)

    built.decoder.generate = watched
    talk.reuses_cache = reuse
    return talk, prompts, notes


def answers(talk, turns) -> list[str]:
    out = []
    for text in turns:
        talk.say(text, lambda piece: None)
        out.append(talk.messages[-1]["content"])
    return out


@pytest.mark.real
def test_the_kept_cache_answers_what_a_fresh_prefill_answers_and_prefills_only_the_new_turn():
    kept, prompts, _ = conversation(SMOLLM2)
    fresh, _, _ = conversation(SMOLLM2, reuse=False)
    assert answers(kept, TURNS) == answers(fresh, TURNS)
    for (length, cached), (before, _) in zip(prompts[1:], prompts):
        assert before < cached < length  # the earlier turns came from the cache


@pytest.mark.real
def test_the_history_changes_the_answer():
    talk, prompts, _ = conversation(SMOLLM2)
    alone, _, _ = conversation(SMOLLM2)
    assert answers(talk, TURNS[:2])[1] != answers(alone, TURNS[1:2])[0]
    assert prompts[1][0] > prompts[0][0] + 10  # the second prompt holds the first turn


@pytest.mark.real
def test_near_the_cache_end_the_oldest_turns_are_dropped_with_a_note():
    talk, prompts, notes = conversation(SMOLLM2, "generate.cache_len=160")
    answers(talk, TURNS * 3)  # about 60 tokens a turn: far past 160 positions
    assert any("dropped the oldest" in note for note in notes)
    assert all(length + 1 <= 160 for length, _ in prompts)
    assert talk.messages[-2]["content"] == TURNS[-1]  # the newest turn is always kept
    history = list(talk.messages)
    talk.say("word " * 300, lambda piece: None)  # alone too long for the cache: refused, history kept
    assert "say less" in notes[-1] and talk.messages == history


def test_a_model_without_a_chat_template_continues_as_plain_text():
    talk, prompts, notes = conversation(TINY)
    assert not talk.templated
    first, second = answers(talk, ["Once upon a time", "and then"])
    assert prompts[1][1] > 0  # still from the cache
    text = talk.built.tokenizer.decode(talk._ids())
    assert text.startswith("Once upon a time\n") and "and then\n" in text


@pytest.mark.real
def test_a_session_in_a_terminal():
    """Two turns, an answer stopped with Ctrl-C, a turn after it, then Ctrl-D."""
    child = pexpect.spawn(sys.executable, ["-m", "runner", "chat", SMOLLM2, *GREEDY[:1], "generate.max_new_tokens=400"],
                          cwd=str(ROOT), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("> ")
        child.sendline(TURNS[0])
        child.expect_exact("> ")
        story = "Write a long story about a dragon and a knight."
        child.sendline(story)
        child.expect_exact(story + "\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # the answer streams...
        for _ in range(10):  # ...and Ctrl-C stops it, not the session (again if a busy machine was slow to see it)
            child.sendintr()
            if child.expect_exact(["[stopped]", "\r\n> ", pexpect.TIMEOUT], timeout=5) != 2:
                break
        assert child.after == "[stopped]", child.before  # not an answer that ran to its end
        child.expect_exact("> ")
        child.sendline("Thanks.")
        child.expect(r"\w+")
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
