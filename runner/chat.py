"""`runner chat`: a conversation with a recipe's model, turn after turn.

The history goes through the tokenizer's chat template (or, without one, grows as plain text),
and the KV cache is kept across turns: each turn prefills only the tokens after the longest
prefix the cache already holds (the new user message and the template's markers). When the
history no longer fits the cache, the oldest turns are dropped, with a note.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import torch

from runner import pipeline as pipelines
from runner.config.schema import Recipe
from runner.decoders.base import common_prefix
from runner.text import TextStream
from runner.tokenizers.chat import render_messages

HELP = "Type a message; /reset starts over, /exit (or Ctrl-D) ends, Ctrl-C stops an answer."


class Conversation:
    """One conversation's history and what the KV cache holds of it."""

    def __init__(self, built: pipelines.Pipeline, recipe_path: str, note: Callable[[str], None]):
        self.built, self.recipe_path, self.note = built, recipe_path, note
        recipe = built.recipe
        self.limit = recipe.generate.cache_len or recipe.model.arch.max_seq_len
        self.lookahead = built.decoder.lookahead
        built.decoder.reserve(self.limit)  # one cache for the whole conversation
        self.templated = built.tokenizer.chat_template is not None
        self.turn_index = 0
        self.reset()

    def reset(self) -> None:
        system = self.built.recipe.generate.system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system and self.templated else []
        self.cached: list[int] = []  # tokens whose keys and values the cache holds, from position 0

    def _ids(self, messages: list[dict] | None = None) -> list[int]:
        tokenizer, messages = self.built.tokenizer, self.messages if messages is None else messages
        if self.templated:
            text = render_messages(tokenizer, messages, self.recipe_path)
            return tokenizer.encode(text, bos=False, allow_special=True)
        # Plain continuation: the turns one after another, as one growing text.
        return tokenizer.encode("".join(m["content"] for m in messages), bos=True)

    def _fit(self) -> list[int] | None:
        """The history's tokens, its oldest turns dropped until it fits with room for an answer;
        None (and the new message taken back) when the new message alone cannot fit."""
        first = 1 if self.messages[0]["role"] == "system" else 0
        alone = len(self._ids(self.messages[:first] + self.messages[-1:]))
        if alone + 1 + self.lookahead > self.limit:
            self.messages.pop()
            self.note(f"chat: that message is {alone} tokens, more than the cache's {self.limit} positions hold "
                      "with an answer; say less")
            return None
        room = min(self.built.recipe.generate.max_new_tokens, 16)  # at least a short answer's worth
        ids, dropped = self._ids(), 0
        while len(ids) + room + self.lookahead > self.limit and len(self.messages) - first > 1:
            del self.messages[first:first + 2]  # the oldest user message and its answer
            dropped += 1
            ids = self._ids()
        if dropped:
            self.note(f"chat: the history neared the cache's {self.limit} positions; dropped the oldest "
                      f"{dropped} turn{'s' * (dropped > 1)}")
        return ids

    def say(self, text: str, write: Callable[[str], None]) -> None:
        """One turn: the user's `text`, the model's answer streamed through `write`."""
        self.messages.append({"role": "user", "content": text if self.templated else text + "\n"})
        ids = self._fit()
        if ids is None:
            return
        recipe = self.built.recipe
        budget = min(recipe.generate.max_new_tokens, self.limit - len(ids) - self.lookahead)
        reuse = common_prefix(self.cached, ids)
        text = TextStream(self.built.tokenizer, recipe.generate.stop)
        out: list[int] = []
        answer: list[str] = []

        def show(token: int) -> bool:
            out.append(token)
            piece = text.push(token)
            answer.append(piece)
            write(piece)
            return text.done

        decoder = self.built.decoder
        generator = torch.Generator(decoder.device).manual_seed(recipe.generate.seed + self.turn_index)
        self.turn_index += 1
        self.cached = ids[:reuse]  # all that is sure to stay valid should this turn be interrupted
        try:
            decoder.generate(ids, budget, self.built.tokenizer.eos_ids, generator, show, cached=reuse)
        finally:  # an answer stopped by Ctrl-C is kept as far as it went
            tail = text.flush()
            answer.append(tail)
            write(tail)
            if out:  # the prompt ran whole; the last token's keys and values are not written yet
                self.cached = ids + out[:-1]
            content = "".join(answer) + ("" if self.templated else "\n")
            self.messages.append({"role": "assistant", "content": content})


def main(recipe: Recipe, recipe_path: str) -> None:
    """`runner chat`: build the recipe's pipeline, then talk on the terminal."""
    try:
        import readline  # noqa: F401 (line editing and history for input())
    except ImportError:
        pass
    from runner.report import Reporter

    report = Reporter()
    run(pipelines.build(recipe, recipe_path, report.note, report.progress), recipe_path, report.note)


def run(built: pipelines.Pipeline, recipe_path: str, note: Callable[[str], None],
        read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive loop: read a line, answer it; until /exit or end of input."""
    conversation = Conversation(built, recipe_path, note)
    if not conversation.templated:
        note("chat: this model's tokenizer has no chat template; the conversation continues as plain text")
    if not built.decoder.reuses_cache:
        note("chat: speculative decoding re-reads the whole history each turn")
    note(HELP)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read("> ")
        except EOFError:  # Ctrl-D
            write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, the session goes on
            write("\n")
            continue
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            conversation.reset()
            note("chat: the conversation starts over")
            continue
        if not command:
            continue
        try:
            conversation.say(line, write)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
