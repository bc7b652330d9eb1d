"""Structured output: a response format (any JSON object, or a JSON schema) compiled by llguidance
into a grammar, and one matcher per row that masks the logits so only tokens the grammar allows
can be drawn.

Build a GrammarTokenizer once per tokenizer and keep it (it indexes every token's bytes); compile a
Grammar per response format; give each row its own Matcher. Per step a row's matcher masks the
logits, the decoder draws from them, and the matcher accepts the drawn token. An end (any eos id)
is allowed exactly when the text so far is a whole document; after it only ends are allowed.
"""
from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence

import llguidance
import torch

from runner.tokenizers.base import Tokenizer

# Whitespace allowed between JSON tokens: one space, or a line break and up to 16 spaces of
# indentation, at most once per place. llguidance's default allows any run, which a sampled model
# can extend forever.
WHITESPACE = r"(?:[ ]|\n[ ]{0,16})?"
JSON_OPTIONS = {"whitespace_pattern": WHITESPACE}  # these override a schema's own "x-guidance" keys
ANY_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}
RESPONSE_TYPES = ("text", "json_object", "json_schema")


class GrammarTokenizer:
    """llguidance's view of a runner tokenizer, padded to the model's `vocab_size` logits.

    Ids whose token adds no bytes (control and special tokens, ids past the tokenizer's own) and
    the eos ids are special to llguidance: a JSON grammar never allows them, except the eos ids
    once the document is whole.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {tokenizer.vocab_size} tokens")
        if not tokenizer.eos_ids:
            raise ValueError("the tokenizer has no eos id, so a constrained row could never end")
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(tokenizer.eos_ids)
        tokens, special = [], []
        for id in range(vocab_size):
            data = tokenizer.token_bytes(id) if id < tokenizer.vocab_size else b""
            if not data or id in self.eos_ids:
                data = b"<[%d]>" % id  # a name only: llguidance marks special tokens and never matches them as text
                special.append(id)
            tokens.append(data)
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, tokens, special))
        self.ll = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=sorted(self.eos_ids))
        self.words = (vocab_size + 31) // 32  # int32 words of a bitmask, one bit per id
        self.end_bitmask = torch.zeros(self.words, dtype=torch.int32)  # the mask after an end: ends only
        for id in self.eos_ids:
            self.end_bitmask.view(torch.uint8)[id // 8] |= 1 << (id % 8)  # little-endian, as in _bias


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads from a tokenizer: each id's bytes, the special ids, bos
    and eos, and an encoder, which llguidance calls with UTF-8 bytes to find how text the grammar
    forces is tokenized."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int]):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = special
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = min(tokenizer.eos_ids)
        special_ids = set(special)
        self._ids = {data: id for id, data in reversed(list(enumerate(tokens))) if id not in special_ids}
        self._longest = max(map(len, self._ids))

    def __call__(self, text: bytes | str) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self.tokenizer.encode(data.decode("utf-8", errors="replace"), bos=False)
        if b"".join(map(self.tokenizer.token_bytes, ids)) == data:
            return ids
        # Not the same bytes: a SentencePiece tokenizer's dummy "▁" before the text, or a byte
        # without a token of its own. llguidance needs ids of exactly these bytes.
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        """The longest token at each place (bytes no token starts with are skipped)."""
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                if (found := self._ids.get(data[start:end])) is not None:
                    ids.append(found)
                    break
            else:
                end = start + 1
            start = end
        return ids


class Grammar:
    """A compiled response format for one GrammarTokenizer; shared by any number of rows."""

    def __init__(self, tokens: GrammarTokenizer, grammar: str):
        """`grammar` is llguidance's serialized grammar; raises ValueError saying why it cannot be used."""
        self.tokens = tokens
        self.source = grammar  # what another process compiles to the same grammar (tensor-parallel ranks)
        self._start = llguidance.LLMatcher(tokens.ll, grammar, log_level=0, limits=_limits())
        if self._start.is_error():  # an unsupported or unsatisfiable schema
            raise ValueError(self._start.get_error())

    @classmethod
    def from_response_format(cls, response_format: object, tokens: GrammarTokenizer) -> Grammar | None:
        """OpenAI's response_format: {"type": "text"} -> None (no constraint); {"type": "json_object"}
        -> any JSON object; {"type": "json_schema", "json_schema": {"schema": {...}, ...}} -> that
        schema ("name", "strict" and "description" are not used).

        Raises ValueError whose message starts with the offending field, e.g.
        "response_format.json_schema.schema: ...".
        """
        if not isinstance(response_format, dict):
            raise ValueError(f"response_format: must be an object with a \"type\", not {_json_type(response_format)}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.from_json_schema(ANY_OBJECT, tokens)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("response_format.json_schema: must be an object holding a \"schema\", "
                                 f"not {_json_type(spec)}")
            if "schema" not in spec:
                raise ValueError("response_format.json_schema.schema: is required")
            try:
                return cls.from_json_schema(spec["schema"], tokens)
            except ValueError as e:
                raise ValueError(f"response_format.json_schema.schema: {e}") from None
        allowed = ", ".join(map(repr, RESPONSE_TYPES))
        raise ValueError(f"response_format.type: must be one of {allowed}, not {kind!r}")

    @classmethod
    def from_json_schema(cls, schema: dict | str, tokens: GrammarTokenizer) -> Grammar:
        """A JSON schema, as an object or its JSON text. Raises ValueError with a message that names
        no field (the caller says which), e.g. "is not a JSON schema runner supports: ..."."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"must be a JSON object (a JSON schema), not {_json_type(schema)}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            return cls(tokens, grammar)
        except (ValueError, TypeError) as e:
            raise ValueError(f"is not a JSON schema runner supports: {e}") from None

    def matcher(self) -> Matcher:
        """A new row's state, at the start of the document."""
        return Matcher(self._start.deep_copy(), self.tokens, self.source)


class Grammars:
    """Compiled grammars for one tokenizer by key, the `keep` most recently used kept. The
    GrammarTokenizer is built on first use (it indexes the vocabulary). Safe across threads:
    compiling runs outside the lock, so one request's schema does not hold up another's."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, keep: int):
        self.tokenizer, self.vocab_size, self.keep = tokenizer, vocab_size, keep
        self._tokens: GrammarTokenizer | None = None
        self._compiled: dict[str, Grammar | None] = {}  # oldest first
        self._lock = threading.Lock()

    def get(self, key: str, compile: Callable[[GrammarTokenizer], Grammar | None]) -> Grammar | None:
        """The grammar kept under `key`, else compile(tokens)'s (its errors propagate, nothing kept)."""
        with self._lock:
            if key in self._compiled:
                self._compiled[key] = self._compiled.pop(key)  # the most recently used now
                return self._compiled[key]
            if self._tokens is None:
                self._tokens = GrammarTokenizer(self.tokenizer, self.vocab_size)
            tokens = self._tokens
        grammar = compile(tokens)
        with self._lock:
            self._compiled[key] = grammar
            if len(self._compiled) > self.keep:
                del self._compiled[next(iter(self._compiled))]
        return grammar


class Matcher:
    """One row's state in a grammar: which ids may come next, and the tokens accepted so far.

    accept takes exactly the ids the mask allows. llguidance alone would also take a token that
    spells text the grammar forces in another way than the tokenizer would (its mask allows only
    the tokenizer's way), so accept reads the mask, computed once per state.

    Ends (eos ids) are kept here, not given to llguidance, so that rollback counts every accepted
    token alike, whether or not the grammar could have gone on.
    """

    def __init__(self, matcher: llguidance.LLMatcher, tokens: GrammarTokenizer, source: str):
        self._ll = matcher
        self.tokens = tokens
        self.source = source  # its grammar's (Grammar.source)
        self._bitmask = torch.empty(tokens.words, dtype=torch.int32)
        self._fresh = False  # _bitmask is the current state's
        self._held = 0  # tokens llguidance has consumed
        self._ends = 0  # ends accepted after them

    @property
    def done(self) -> bool:
        """Only an end may follow: the document is whole and cannot go on (or has ended)."""
        return self._ends > 0 or self._ll.is_stopped()

    def bitmask(self) -> torch.Tensor:
        """The ids that may come next: int32 [ceil(V / 32)] on the CPU, bit i of word w for id 32w + i.
        Valid until the matcher accepts or rolls back."""
        if self._ends:
            return self.tokens.end_bitmask
        if not self._fresh:
            self._ll.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
            if self._ll.is_error():  # only a resource limit of llguidance's gets here
                raise RuntimeError(f"the grammar cannot go on: {self._ll.get_error()}")
            if not self._bitmask.any():  # e.g. an enum value with a character no token can write
                raise RuntimeError("the grammar allows no token here: the tokenizer cannot write what it requires")
            self._fresh = True
        return self._bitmask

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every id the grammar forbids at -inf, the others unchanged (a new tensor)."""
        return logits + _bias(self.bitmask().to(logits.device), logits)

    def accept(self, token: int) -> None:
        """Advance past `token`; raises ValueError (and stays as it was) if the mask forbids it."""
        if not 0 <= token < self.tokens.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {self.tokens.vocab_size} ids")
        if not int(self.bitmask()[token // 32]) >> (token % 32) & 1:
            raise ValueError(f"token {token} is not allowed by the grammar here")
        if token in self.tokens.eos_ids:
            self._ends += 1
            return
        if self._ll.try_consume_tokens([token]) != 1:
            raise RuntimeError(f"llguidance refused token {token}, which its mask allowed: {self._ll.get_error()}")
        self._held += 1
        self._fresh = False

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (for speculative verification's rejected drafts)."""
        if not 0 <= n <= self._held + self._ends:
            raise ValueError(f"cannot roll back {n} tokens: {self._held + self._ends} were accepted")
        ends = min(n, self._ends)
        self._ends -= ends
        if n > ends:
            if not self._ll.rollback(n - ends):
                raise RuntimeError(f"llguidance could not roll back {n - ends} tokens: {self._ll.get_error()}")
            self._held -= n - ends
            self._fresh = False


def mask_rows(matchers: Sequence[Matcher | None], logits: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with each row masked by its matcher (None: left as is), as one tensor op."""
    words = (logits.shape[-1] + 31) // 32
    bitmasks = torch.full((len(matchers), words), -1, dtype=torch.int32)  # -1: every bit set
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            bitmasks[row] = matcher.bitmask()
    return logits + _bias(bitmasks.to(logits.device), logits)


def _bias(bitmask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """0 for each allowed id, -inf for each forbidden one: [..., V] like `logits`, from the bitmask
    [..., ceil(V / 32)]. Adding it is faster than masked_fill on the CPU and keeps allowed logits exact."""
    # Each byte of the bitmask looks up its 8 ids' biases; on a little-endian machine (x86, ARM)
    # byte k of word w holds ids 32w + 8k .. 32w + 8k + 7 in bit order.
    table = _byte_bias(logits.dtype, logits.device)  # [256, 8]
    data = bitmask.contiguous().view(torch.uint8)  # [..., 4W]
    bias = table.index_select(0, data.reshape(-1).int()).view(*data.shape[:-1], -1)  # [..., 32W]
    return bias[..., : logits.shape[-1]]


@functools.cache
def _byte_bias(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where its bit j is set and -inf where not."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf")).to(dtype=dtype, device=device)


def _limits() -> llguidance.LLParserLimits:
    # Short errors: the default dumps the parser state and the grammar into the message.
    return llguidance.LLParserLimits(verbose_errors=False)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
