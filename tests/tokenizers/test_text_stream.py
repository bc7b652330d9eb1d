"""TextStream: text appears as soon as its characters are complete, and nothing is lost."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runner.tokenizers import TextStream
from tests.helpers.tokenizers import texts


def streamed(tokenizer, ids) -> list[str]:
    """What each push returned, then what flush returned."""
    stream = TextStream(tokenizer)
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
    stream = TextStream(tt)
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
