"""Third-party clients against the live server, unchanged: LangChain (`langchain-openai`),
the OpenAI Agents SDK and LiteLLM, each pointed at the server's base URL as its users
would point it. Chat, streaming, a tools round trip, structured output, embeddings, the
Responses API and an agent run with a function tool.

The live server is the support deployment: questions stay on its topics.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Annotated

import pytest
from pydantic import BaseModel, Field

# LiteLLM fetches its model price list from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTION = "Where is my order? It has not arrived yet."
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order by its id.",
        # A pattern, as a careful schema has: unbounded strings let a 135M model ramble
        # inside the quotes until max_tokens.
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}}, "required": ["order_id"]},
    },
}


class OrderQuery(BaseModel):
    order_id: str = Field(pattern=r"^ORD-[0-9]{4}$")
    urgent: bool


# ------------------------------------------------------------------ LangChain


@pytest.fixture(scope="module")
def chat_model(live_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=live_server.base_url, api_key=live_server.key, temperature=0, max_tokens=128, max_retries=0, timeout=180)


def test_langchain_invoke_and_stream(chat_model):
    reply = chat_model.invoke(QUESTION)
    assert reply.content and reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata["input_tokens"] > 0 and reply.usage_metadata["output_tokens"] > 0
    chunks = list(chat_model.stream(QUESTION))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == reply.content


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage

    with_tools = chat_model.bind_tools([LOOKUP], tool_choice="required")
    question = HumanMessage("Where is order ORD-5002?")
    called = with_tools.invoke([question])
    assert called.tool_calls and called.tool_calls[0]["name"] == "lookup_order"
    assert isinstance(called.tool_calls[0]["args"]["order_id"], str)
    result = ToolMessage(json.dumps({"status": "shipped", "eta": "tomorrow"}), tool_call_id=called.tool_calls[0]["id"])
    # The answer step (a 135M model left on "auto" tends to call again).
    answered = chat_model.bind_tools([LOOKUP], tool_choice="none").invoke([question, called, result])
    assert answered.content and not answered.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_with_a_pydantic_schema(chat_model, method):
    structured = chat_model.with_structured_output(OrderQuery, method=method)
    value = structured.invoke("My order ORD-5002 has not arrived and I need it today. Extract the order id and whether it is urgent.")
    assert isinstance(value, OrderQuery) and value.order_id


def test_langchain_structured_output_in_json_mode(chat_model):
    structured = chat_model.with_structured_output(None, method="json_mode")
    # The object's shape named: asked for "a JSON object", the 135M model invents an
    # order record whose strings run past max_tokens, and LangChain (through the openai
    # SDK's parser) raises on a length-cut answer.
    value = structured.invoke("Is my order late? Answer as a JSON object with one key, late, true or false.")
    assert isinstance(value, dict)


def test_langchain_responses_api(live_server):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=MODEL, base_url=live_server.base_url, api_key=live_server.key, temperature=0, max_tokens=32, use_responses_api=True, max_retries=0, timeout=180)
    reply = model.invoke(QUESTION)
    assert reply.text and reply.response_metadata["id"].startswith("resp_")


def test_langchain_embeddings_offline(live_server):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: otherwise LangChain fetches a tokenizer file from
    # the internet to split long inputs (documented in the README).
    embeddings = OpenAIEmbeddings(model="all-MiniLM-L6-v2", base_url=live_server.base_url, api_key=live_server.key, check_embedding_ctx_length=False)
    vectors = embeddings.embed_documents(["refund policy", "delivery times"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert len(embeddings.embed_query("where is my parcel")) == 384


# ------------------------------------------------------------------ OpenAI Agents SDK


def _agent_models(live_server):
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI otherwise
    client = AsyncOpenAI(base_url=live_server.base_url, api_key=live_server.key, max_retries=0, timeout=180)
    return {"chat": OpenAIChatCompletionsModel(model=MODEL, openai_client=client), "responses": OpenAIResponsesModel(model=MODEL, openai_client=client)}


def _order_agent(model):
    from agents import Agent, ModelSettings, function_tool

    # A pattern on the id, as LOOKUP has: the SDK's schema of a bare `str` is an unbounded
    # string, inside which the 135M model can ramble until max_tokens.
    @function_tool
    def lookup_order(order_id: Annotated[str, Field(pattern=r"^ORD-[0-9]{4}$")]) -> str:
        """Look up an order by its id."""
        return json.dumps({"order_id": order_id, "status": "shipped"})

    return Agent(
        name="support",
        instructions="You help customers with their orders. Use lookup_order to find an order.",
        model=model,
        tools=[lookup_order],
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=128),
        tool_use_behavior="stop_on_first_tool",
    )


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_sdk_run_with_a_function_tool(live_server, kind):
    from agents import Runner

    agent = _order_agent(_agent_models(live_server)[kind])
    result = asyncio.run(Runner.run(agent, "Where is order ORD-5002?"))
    assert json.loads(result.final_output)["status"] == "shipped"


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_sdk_streamed_run(live_server, kind):
    from agents import Agent, ModelSettings, Runner

    # The SDK (0.24) fails a run whose Responses stream ends `incomplete`, as a
    # max_output_tokens cut does: the question is one the model answers in a few words.
    agent = Agent(name="support", instructions="You help customers with their orders.", model=_agent_models(live_server)[kind],
                  model_settings=ModelSettings(temperature=0, max_tokens=64))

    async def run() -> tuple[str, list[str]]:
        streamed = Runner.run_streamed(agent, "Hello!")
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed.final_output, kinds

    final, kinds = asyncio.run(run())
    assert final and "raw_response_event" in kinds


# ------------------------------------------------------------------ LiteLLM


def _litellm_args(live_server) -> dict:
    return {"model": f"openai/{MODEL}", "api_base": live_server.base_url, "api_key": live_server.key, "temperature": 0, "max_tokens": 48, "timeout": 180}


def test_litellm_completion_and_stream(live_server):
    import litellm

    messages = [{"role": "user", "content": QUESTION}]
    reply = litellm.completion(messages=messages, **_litellm_args(live_server))
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    chunks = list(litellm.completion(messages=messages, stream=True, **_litellm_args(live_server)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


def test_litellm_tools_and_structured_output(live_server):
    import litellm

    args = {**_litellm_args(live_server), "max_tokens": 128}
    called = litellm.completion(messages=[{"role": "user", "content": "Where is order ORD-5002?"}], tools=[LOOKUP], tool_choice="required", **args)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments)["order_id"]
    shaped = litellm.completion(messages=[{"role": "user", "content": "Order ORD-5002 is late and urgent. Extract it."}], response_format=OrderQuery, **args)
    assert OrderQuery.model_validate_json(shaped.choices[0].message.content).order_id


def test_litellm_embeddings_and_responses(live_server):
    import litellm

    vectors = litellm.embedding(model="openai/all-MiniLM-L6-v2", input=["refund policy"], api_base=live_server.base_url, api_key=live_server.key)
    assert len(vectors.data[0]["embedding"]) == 384
    response = litellm.responses(model=f"openai/{MODEL}", input=QUESTION, api_base=live_server.base_url, api_key=live_server.key, max_output_tokens=24, temperature=0)
    assert response.id.startswith("resp_") and response.output
