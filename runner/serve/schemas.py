"""Request bodies of the OpenAI-compatible routes. Unknown fields are ignored, as OpenAI does;
a field of the wrong type or out of range is a 400 naming it, and so is a field of OpenAI's
that would change the output in a way this server does not implement (UNSUPPORTED)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 20
# torch.Generator.manual_seed takes a signed or unsigned 64-bit seed; choice i of n draws with seed + i.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1


# OpenAI's fields this server does not implement, each with the values that ask for nothing (a
# request may send those); any other value is a 400 naming the field. Fields that change nothing
# about the output (user, metadata, store, service_tier, ...) are ignored as unknown fields are.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "reasoning_effort": (None,),
    "web_search_options": (None,),
}
MAX_BIAS = 100  # OpenAI's range for logit_bias values: -100 bans a token, 100 all but forces it


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampled(BaseModel):
    """The fields both routes share. A field left out takes the recipe's generate.* value."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # not OpenAI's; vLLM and llama.cpp take it too
    min_p: float | None = Field(default=None, ge=0, le=1)  # not OpenAI's; vLLM and llama.cpp take it too
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)  # HF's; vLLM's too
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as JSON object keys are: text) -> bias
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}: checked
    # when compiled (runner.decoders.grammar), which names the part that is wrong.
    response_format: Any = None

    # Declared so that they can be refused by name (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value, info):
        if not any(value == neutral and type(value) is type(neutral) for neutral in UNSUPPORTED[info.field_name]):
            raise ValueError("this server does not implement it; leave it out (docs/serving.md lists what is served)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value):
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit() and len(token) <= 12):
                raise ValueError(f"keys must be token ids (non-negative integers as text), got {token!r}")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise ValueError(f"biases must be between -{MAX_BIAS} and {MAX_BIAS}, got {bias} for token {token}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampled):
    # One prompt (text or token ids) or several; each gets n choices.
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]  # ids as JSON integers, not 1.0 or "1"
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant's turn (OpenAI's, with tool calls)

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts), not null")
        return self

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        # The chat templates know "system"; OpenAI's newer "developer" is the same thing.
        return {"role": "system" if self.role == "developer" else self.role, "content": text or ""}


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprob_count(self) -> int:
        """The scheduler's Job.logprobs: -1 for none."""
        return (self.top_logprobs or 0) if self.logprobs else -1
