"""Task spec and example models exchanged with Claude, plus the system prompts.

Each system prompt starts with a marker line ("[tuner:define]", ...) so scripted
fakes can tell which step is calling.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from jobs.catalog import supported_ids

DEFAULT_BASE_MODEL = "unsloth/Llama-3.2-1B-Instruct"


class TaskSpec(BaseModel):
    """What the small model must do; the approved version drives data generation."""

    name: str = Field(description="Short slug-like name for the task")
    description: str = Field(description="What the model does, in one or two sentences")
    inputs: str = Field(description="What a user prompt looks like")
    output_requirements: str = Field(description="What a good response must contain / format")
    style: str = Field(description="Tone, length and formatting rules")
    system_prompt: str = Field(description="System prompt the small model is trained with")
    example_count: int = 1000
    base_model: str = DEFAULT_BASE_MODEL
    max_output_tokens: int = 1024
    budget_usd: float | None = None
    gguf: bool = Field(default=False, description="Also export a GGUF file (llama.cpp)")


class DefineTurn(BaseModel):
    """One step of the clarifying-question loop: ask a question or return a spec."""

    ready: bool = Field(description="True when the task is clear enough to write the spec")
    question: str | None = Field(default=None, description="One clarifying question if not ready")
    spec: TaskSpec | None = Field(default=None, description="The spec when ready")


class ExamplePair(BaseModel):
    prompt: str
    response: str
    reference: str | None = None


class SampleBatch(BaseModel):
    examples: list[ExamplePair]


DEFINE_SYSTEM = """[tuner:define]
You help a user turn a task they currently run on a large LLM into a precise task
specification for fine-tuning a small model. Read the conversation. If anything
essential is unclear (inputs, expected output format, style, edge cases), set
ready=false and ask exactly ONE short clarifying question. Ask at most three
questions overall; after that, or once the task is clear, set ready=true and fill
`spec`: a slug `name`, `description`, `inputs`, `output_requirements`, `style`,
and a `system_prompt` the small model will be trained with. Keep defaults for
example_count, base_model and max_output_tokens unless the user asked otherwise.
base_model must be one of these ids, spelled exactly: """ + ", ".join(supported_ids()) + """.
If the user asks for another model, say in a question that it is not supported and
name these instead."""

SAMPLES_SYSTEM = """[tuner:samples]
You write training examples for fine-tuning a small model on the task below.
Each example is a realistic user `prompt` and the ideal `response` that follows the
task's output requirements and style exactly. Make examples varied: different
topics, lengths, personas and difficulty. Follow every guideline given. Return
exactly the number of examples asked for."""

GENERATE_SYSTEM = """[tuner:generate]
You write training examples for fine-tuning a small model on the task below.
Each example is a realistic user `prompt` and the ideal `response` that follows the
task's output requirements and style exactly. Stay close to the topic seed you are
given so that batches differ from each other; never repeat an earlier example.
Follow every guideline given. Return exactly the number of examples asked for."""


def spec_brief(spec: TaskSpec) -> str:
    """The spec as plain text for prompts."""
    return (
        f"Task: {spec.name}\n"
        f"Description: {spec.description}\n"
        f"Inputs: {spec.inputs}\n"
        f"Output requirements: {spec.output_requirements}\n"
        f"Style: {spec.style}\n"
        f"System prompt of the small model: {spec.system_prompt}\n"
        f"Keep each response under about {spec.max_output_tokens} tokens."
    )
