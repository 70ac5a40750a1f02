"""OpenAI Responses API bodies (POST /v1/responses) as pydantic models: the request with its input items, and the
response object with its output items, field for field as the official client's types
(`openai/types/responses/`). Input items an earlier response produced (its output) parse as input items too, which
is how a stored conversation is carried into the next turn."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

from microscale.serve.protocol import ChatTool, FunctionDefinition, PositiveInt64, Text

# ---- input items ----------------------------------------------------------------------------------------


class TextContent(BaseModel):
    """A text part: input_text (user, system, developer) or output_text (an assistant message passed back)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text"]
    text: Text


def _joined(content: str | list[TextContent]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[TextContent]

    def text(self) -> str:
        return _joined(self.content)


class FunctionCallItem(BaseModel):
    """A call the model made (an earlier output, or the client's own record of it)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text
    id: Text | None = None


class FunctionCallOutputItem(BaseModel):
    """The client's result for a call, matched to it by call_id."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[TextContent]

    def text(self) -> str:
        return _joined(self.output)


class ReasoningText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning_text"] = "reasoning_text"
    text: Text


class ReasoningItem(BaseModel):
    """gpt-oss's analysis channel, as an earlier response gave it back."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]
    id: Text | None = None
    content: list[ReasoningText] | None = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


def _item_type(item: Any) -> str:
    # Easy input messages ({"role", "content"}) leave out their type.
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]
# An earlier response's output items, dumped, parse as input items of the next turn.
INPUT_ITEMS = TypeAdapter(list[InputItem])

# ---- request --------------------------------------------------------------------------------------------


class FunctionTool(FunctionDefinition):
    """Chat's function definition, flat: {"type": "function", "name", "description", "parameters", "strict"}."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]

    def as_chat_tool(self) -> ChatTool:
        return ChatTool(type="function", function=FunctionDefinition(**self.model_dump(exclude={"type"})))


class ToolChoiceFunction(BaseModel):
    type: Literal["function"]
    name: Text


class TextFormat(BaseModel):
    """text.format: plain text, any JSON object, or JSON following a schema (flat, unlike chat's response_format)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    # Echoed in the response as given: fields left out stay out.
    name: Text | None = Field(default=None, exclude_if=lambda v: v is None)
    description: Text | None = Field(default=None, exclude_if=lambda v: v is None)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", exclude_if=lambda v: v is None)
    strict: bool | None = Field(default=None, exclude_if=lambda v: v is None)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    # OpenAI's bounds: 16 pairs, keys up to 64 characters, values up to 512.
    if len(metadata) > 16:
        raise ValueError("must have at most 16 key-value pairs")
    if any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise ValueError("keys must be at most 64 characters and values at most 512")
    return metadata


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = None
    input: Text | list[InputItem] = Field(default_factory=list)
    instructions: Text | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None  # None: "auto"
    parallel_tool_calls: bool = True
    text: TextConfig = Field(default_factory=TextConfig)
    reasoning: ReasoningConfig | None = None
    max_output_tokens: PositiveInt64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: Text | None = None
    metadata: Annotated[dict[Text, Text], AfterValidator(_check_metadata)] | None = None
    user: Text | None = None

    def input_items(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return list(self.input)

    def tool_choice_name(self) -> str | None:
        """As chat_tools.RequestTools takes it: a named function by its name; "auto" (OpenAI's default, with or
        without tools) as None."""
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return None if choice == "auto" else choice
        return choice.name


# ---- response -------------------------------------------------------------------------------------------

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | OutputReasoning | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete"]
    background: bool = False
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    store: bool
    temperature: float | None = None
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction
    tools: list[FunctionTool]
    top_p: float | None = None
    usage: ResponseUsage | None = None
    user: str | None = None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
