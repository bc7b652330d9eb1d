"""runner.text.TextStream: text appears as soon as its characters are complete, nothing is lost,
and the text is cut before the first stop string or at an EOS id, never taking back what it printed."""
from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from runner.text import TextStream
from tests.helpers.tokenizers import texts


def streamed(tokenizer, ids) -> list[str]:
    """What each push returned, then what flush returned (EOS ids are text here: none ends it)."""
    stream = TextStream(tokenizer, eos_ids=())
    return [stream.push(i) for i in ids] + [stream.flush()]


def any_ids(tokenizer):
    return st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_stream_is_the_replace_decode_of_all_bytes(tt, sp, data):
    # Random ids make split and invalid UTF-8 (lone continuation bytes, truncated characters).
    for tokenizer in (tt, sp):
        ids = data.draw(any_ids(tokenizer))
        expected = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        assert "".join(streamed(tokenizer, ids)) == expected


@settings(max_examples=50, deadline=None)
@given(texts())
def test_text_appears_as_soon_as_each_character_is_complete(tt, text):
    ids = tt.encode(text, bos=False)
    parts = streamed(tt, ids)
    assert "".join(parts) == text
    emitted = ""
    for k, part in enumerate(parts[:-1]):
        emitted += part
        assert text.startswith(emitted)
        # All that is held back is the start of the next character.
        held = b"".join(tt.token_bytes(i) for i in ids[: k + 1])[len(emitted.encode()) :]
        if held:
            next_char = text[len(emitted)].encode()
            assert next_char.startswith(held) and len(held) < len(next_char)
    assert parts[-1] == ""


def test_a_character_split_across_tokens_appears_once_complete(tt):
    assert tt.encode("€", bos=False) == [0xE2, 0x82, 0xAC]  # three single-byte tokens
    assert streamed(tt, [ord("a"), 0xE2, 0x82, 0xAC, ord("b")]) == ["a", "", "", "€", "b", ""]


def test_flush_replaces_an_incomplete_character_and_restarts(tt):
    stream = TextStream(tt, eos_ids=())
    assert [stream.push(0xE2), stream.push(0x82)] == ["", ""]
    assert stream.flush() == "\ufffd"
    assert stream.push(ord("a")) == "a"  # the held bytes are gone
    assert stream.flush() == ""


def test_special_tokens_stream_nothing(tt):
    ids = [tt.bos_id, *tt.encode("\x00\x01", bos=False), *sorted(tt.eos_ids)]
    assert streamed(tt, ids) == ["", "\x00", "\x01", "", "", ""]


def test_sentencepiece_word_pieces_carry_their_space(sp):
    # The first piece carries the dummy-prefix space: a continuation of a prompt needs it.
    assert "".join(streamed(sp, sp.encode("name is Bob", bos=False))) == " name is Bob"


class PieceTokenizer:
    """A vocabulary of text pieces: id i prints pieces[i]; the last id is EOS."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.vocab_size = len(pieces) + 1
        self.eos_ids = frozenset({len(pieces)})

    def token_bytes(self, id: int) -> bytes:
        return self.pieces[id].encode() if id < len(self.pieces) else b""


ALPHABET = st.sampled_from("ab c\n")  # few letters: stops occur, and overlap their own prefixes


@settings(max_examples=300, deadline=None)
@example(["b\n", " "], ["\n", "b\n "], False)  # the longer stop starts first but completes a token later
@given(st.lists(st.text(ALPHABET, max_size=4), max_size=12),
       st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3), st.booleans())
def test_the_printed_text_is_the_stream_cut_before_the_first_stop(pieces, stops, eos):
    # A stream stops at the first token after which the text holds a stop string, cut before the
    # earliest of those it holds then (as vLLM and OpenAI stop): a longer stop that starts earlier
    # but would complete only with a later token does not count.
    tokenizer = PieceTokenizer(pieces)
    text, first = "", None
    for piece in pieces:
        text += piece
        first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
        if first is not None:
            break
    text += "".join(pieces)[len(text):]
    stream = TextStream(tokenizer, stops)
    printed, seen = "", ""
    for i, piece in enumerate(pieces):
        printed += stream.push(i)
        seen += piece
        assert seen.startswith(printed) or stream.stopped  # only what stays printed is printed
        if not stream.stopped:
            # held back: at most the longest proper prefix of a stop string
            assert len(seen) - len(printed) < max((len(s) for s in stops), default=1)
    printed += stream.push(len(pieces)) if eos else stream.flush()
    assert printed == (text if first is None else text[:first])
    assert stream.stopped == (first is not None)
    assert stream.ended == (eos and first is None)
    assert stream.done == (stream.stopped or stream.ended)
    if stream.done:  # nothing after the end
        assert stream.flush() == "" and all(stream.push(i) == "" for i in range(tokenizer.vocab_size))


def test_eos_ends_the_text_with_what_was_held_back(tt):
    eos = min(tt.eos_ids)
    stream = TextStream(tt, stops=["ab"])
    assert stream.push(ord("x")) == "x"
    assert stream.push(ord("a")) == ""  # may begin "ab"
    assert stream.push(0xE2) == ""  # a partial character
    assert stream.push(eos) == "a\ufffd" and stream.ended and not stream.stopped
    assert stream.push(ord("b")) == "" and stream.flush() == ""


def test_a_stop_string_completed_by_the_flushed_replacement_character_stops(tt):
    stream = TextStream(tt, stops=["a\ufffd"])
    assert stream.push(ord("a")) == "" and stream.push(0xE2) == ""
    assert stream.flush() == "" and stream.stopped
