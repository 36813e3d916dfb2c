"""Tool calling (lminf_gguf/tools.py): the parsers and the request checks without a model; then, on the offline
Qwen2.5-Coder-0.5B-Instruct (whose chat template takes tools), forced and free calls, streamed call deltas, a tool
result going back into the conversation, and the real clients' default tool and structured-output paths (openai,
instructor, langchain-openai, pydantic-ai, llama-index) against an in-process server; the default model (whose
template takes no tools) for the refusals and the no-op fields.

The Qwen file comes from conftest's qwen_path (LMINF_TEST_QWEN, else the packaged "qwen2.5-coder-0.5b")."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from conftest import needs_default_model

import lminf_gguf
from lminf_gguf import tools
from lminf_gguf.errors import InvalidInputError
from lminf_gguf.server import make_server, parse_chat_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40},
                                                    "hour24": {"type": "boolean"}},
                   "required": ["zone", "hour24"]}}}
SYSTEM = {"role": "system", "content": "You are a helpful assistant. When a tool result is given, answer the "
                                       "user's question in one sentence using it."}
ASK = {"role": "user", "content": "What is the weather like in Paris?"}
HISTORY = [SYSTEM, ASK,
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "23 C and sunny"}]
NAMES = ("get_weather", "get_time")


# -- parsers and checks (no model) --------------------------------------------------------------------------------

def _call(name, args):
    return {"name": name, "arguments": args}


def _calls(reply):
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in reply]


@pytest.mark.parametrize("fmt, text, content, calls", [
    (tools.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [_call("get_weather", {"city": "Paris"})]),
    (tools.HERMES, 'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC", "hour24": true}}'
                   '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                   '</tool_call>', "Let me look.",
     [_call("get_time", {"zone": "UTC", "hour24": True}), _call("get_weather", {"city": "Oslo"})]),
    # Qwen2.5-Coder writes bare calls, without the tags its template asks for (llama.cpp accepts them too)
    (tools.HERMES, '{"name": "get_weather", "arguments": {"city": "Paris"}}', None,
     [_call("get_weather", {"city": "Paris"})]),
    (tools.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city"', None, []),   # cut: stays text
    (tools.HERMES, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', None, []),  # not offered
    (tools.HERMES, "It is sunny. <tool_ca", "It is sunny. <tool_ca", []),
    (tools.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [_call("get_weather", {"city": "Rome"})]),
    (tools.LLAMA3, '{"type": "function", "name": "get_weather", "parameters": {"city": "Rome"}}; '
                   '{"name": "get_time", "parameters": {"zone": "CET", "hour24": false}}', None,
     [_call("get_weather", {"city": "Rome"}), _call("get_time", {"zone": "CET", "hour24": False})]),
    (tools.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Rome"}}\n{"response": "done"}', None, []),
    (tools.GENERIC, '```json\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Lima"}}]}\n```', None,
     [_call("get_weather", {"city": "Lima"})]),
    (tools.GENERIC, '{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}', None,
     [_call("get_weather", {"city": "Lima"})]),
    (tools.GENERIC, "The answer is {1, 2}.", "The answer is {1, 2}.", []),
])
def test_parse_calls(fmt, text, content, calls):
    got_content, got = tools.split_reply(text, fmt, NAMES, parallel=True)
    assert _calls(got) == calls
    assert got_content == (text if not calls and content is None else content)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
    # streamed in pieces of any size, the filter gives the same content and calls
    for size in (1, 3, 7):
        f = tools.CallFilter(fmt, NAMES, True)
        events = [e for i in range(0, len(text), size) for e in f.feed(text[i:i + size])] + f.close()
        assert "".join(t for k, t in events if k == "content") == (got_content or "")
        assert _calls([t for k, t in events if k == "call"]) == calls


def test_parallel_false_keeps_the_first_call():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC", "hour24": true}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    _, calls = tools.split_reply(text, tools.HERMES, NAMES, parallel=False)
    assert [c["function"]["name"] for c in calls] == ["get_time"]


def test_template_format():
    assert tools.template_format("{% if tools %}<tool_call>{{ tools | tojson }}{% endif %}") is tools.HERMES
    assert tools.template_format("{% for t in tools %}{{ t | tojson }}{% endfor %}<|python_tag|>") is tools.LLAMA3
    assert tools.template_format("{% if tools %}{{ tools | tojson }}{% endif %}") is tools.GENERIC
    # a template that only mentions the word in its text does not take tools
    assert tools.template_format("{{ 'use tools wisely' }}{% for m in messages %}{{ m.content }}{% endfor %}") \
        is None


def test_tool_fields_checked_no_ops_accepted():
    for noop in ((None, None, None), ([], None, None), ([], "required", None), ([], "none", True),
                 ([WEATHER], "none", None), (None, None, False)):
        assert not tools.check_tools(*noop).active
    plan = tools.check_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False)
    assert plan.active and [f["name"] for f in plan.forced] == ["get_time"] and not plan.parallel
    assert tools.check_tools([WEATHER], "auto").forced is None
    for bad, named in (([{"type": "function"}], "tools[0]"), ([{"type": "web_search"}], "web_search"),
                       ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
                       ([WEATHER, WEATHER], "twice"), ([WEATHER], "sometimes"), ("x", "tools")):
        args = (bad, "sometimes") if named == "sometimes" else (bad,)
        with pytest.raises(tools.ToolInputError) as e:
            tools.check_tools(*args)
        assert named in str(e.value)
    with pytest.raises(tools.ToolInputError, match="get_time.*not among the tools"):
        tools.check_tools([WEATHER], {"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(tools.ToolInputError, match="parallel_tool_calls"):
        tools.check_tools([WEATHER], None, "yes")


def test_server_keeps_the_tool_call_history():
    """The dropped-history bug: the server used to keep only role and content of each message."""
    echoed = dict(HISTORY[2], refusal=None, audio=None, function_call=None, annotations=[])  # openai's echo
    body = {"messages": [HISTORY[1], echoed, dict(HISTORY[3], name="get_weather")],
            "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}
    out = parse_chat_request(body)
    assert out["messages"][1]["tool_calls"] == HISTORY[2]["tool_calls"]
    assert out["messages"][2] == {"role": "tool", "content": "23 C and sunny", "tool_call_id": "call_1",
                                  "name": "get_weather"}
    assert (out["tools"], out["tool_choice"], out["parallel_tool_calls"]) == ([WEATHER], "auto", False)
    # a field that carries what no template can be given is refused by name
    for field, value in (("made_up", 1), ("refusal", "no"), ("tool_calls", [{"type": "function"}])):
        msgs = [HISTORY[1], dict(HISTORY[2], **{field: value})]
        with pytest.raises(Exception) as e:
            parse_chat_request({"messages": msgs})
        assert getattr(e.value, "status", None) == 400 and f"messages[1].{field}" in str(e.value)
    # the no-op tool fields of a request are accepted
    for noop in ({"tools": []}, {"tool_choice": "none"}, {"parallel_tool_calls": True},
                 {"tool_choice": "required"}):
        parse_chat_request({"messages": [ASK], **noop})


def test_template_messages_as_templates_read_them():
    msgs = tools.template_messages(HISTORY)
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and msgs[2]["content"] == ""
    assert msgs[3]["name"] == "get_weather"
    assert HISTORY[2]["content"] is None  # the caller's messages are left as they were


def test_call_grammar_prefixes_each_schema():
    plan = tools.check_tools([WEATHER, TIME], "required", False)
    text = tools.call_gbnf(tools.HERMES, plan)
    assert 'root ::= call\n' in text and "t0-root ::=" in text and "t1-root ::=" in text
    assert '"<tool_call>\\n"' in text and '\\"get_time\\"' in text
    assert not any(line.startswith(("space ::=", "root-", "string ::=")) for line in text.splitlines())


# -- the default model: its template takes no tools -----------------------------------------------------------------

class _Served:
    """An in-process server over llm, with a small JSON client."""

    def __init__(self, llm):
        self.llm = llm
        self.server = make_server(llm, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def post(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.llm.close()


@pytest.fixture(scope="module")
def smol():
    served = _Served(lminf_gguf.LMInfinite(n_local=256, n_threads=1))
    yield served
    served.close()


@needs_default_model
def test_default_model_refuses_tools_and_accepts_no_ops(smol):
    chat = {"messages": [ASK], "max_tokens": 1, "temperature": 0}
    status, body = smol.post("/v1/chat/completions", {**chat, "tools": [WEATHER]})
    assert status == 400
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in body["error"]["message"] and "'tools'" in body["error"]["message"]
    status, body = smol.post("/v1/chat/completions", {**chat, "messages": HISTORY})
    assert status == 400 and "messages[2].tool_calls" in body["error"]["message"]
    for noop in ({"tools": []}, {"tool_choice": "none", "tools": [WEATHER]}, {"parallel_tool_calls": False},
                 {"tool_choice": "required"}):
        status, body = smol.post("/v1/chat/completions", {**chat, **noop})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(InvalidInputError, match="never references 'tools'"):
        smol.llm.create_chat_completion([ASK], tools=[WEATHER], max_tokens=1)


@needs_default_model
def test_call_grammar_of_rich_schemas_parses_and_generates(smol):
    """Prefixed rules of several converted schemas (patterns, enums, $defs references, arrays) form one grammar
    that llama.cpp's parser takes; what it generates is a call (Hermes format, greedy, on the default model)."""
    rich = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"Seat": {"enum": ["aisle", "window"]}},
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,4}$"},
                       "seats": {"type": "array", "items": {"$ref": "#/$defs/Seat"}, "maxItems": 2},
                       "when": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1}}}},
        "required": ["code", "seats"]}}}
    plan = tools.check_tools([WEATHER, rich], {"type": "function", "function": {"name": "book"}}, False)
    text = smol.llm.generate("Book a flight: ", grammar=tools.call_grammar(tools.HERMES, plan), max_tokens=200,
                             temperature=0)
    _, calls = tools.split_reply(text, tools.HERMES, plan.names, False)
    assert [c["function"]["name"] for c in calls] == ["book"], text
    args = json.loads(calls[0]["function"]["arguments"])
    assert set(args) >= {"code", "seats"} and all(s in ("aisle", "window") for s in args["seats"])


# -- Qwen2.5-Coder-0.5B: forced and free calls, results, streams -------------------------------------------------

@pytest.fixture(scope="module")
def qwen(qwen_path):
    llm = lminf_gguf.LMInfinite(qwen_path, n_local=1024, n_threads=1)
    served = _Served(llm)
    yield served
    served.close()


def _greedy(**kw):
    return dict(max_tokens=60, temperature=0, **kw)


def test_required_call_matches_the_schema(qwen):
    ask = {"role": "user", "content": "What time is it in Tokyo, on a 24-hour clock?"}
    out = qwen.llm.create_chat_completion([ask], tools=[WEATHER, TIME], tool_choice="required",
                                          parallel_tool_calls=False, **_greedy())
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_time":
        assert set(args) == {"zone", "hour24"} and isinstance(args["zone"], str) and \
            isinstance(args["hour24"], bool)
    else:
        assert call["function"]["name"] == "get_weather" and isinstance(args["city"], str)


def test_named_call_streams_the_same_call(qwen):
    kw = dict(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
              **_greedy())
    whole = qwen.llm.create_chat_completion([ASK], **kw)["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in whole] == ["get_weather"]
    assert json.loads(whole[0]["function"]["arguments"])["city"] == "Paris"
    chunks = list(qwen.llm.create_chat_completion([ASK], stream=True, **kw))
    calls: dict = {}
    for chunk in chunks:
        for d in chunk["choices"][0]["delta"].get("tool_calls", []):
            c = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = d.get("id", c["id"])
            c["name"] += d.get("function", {}).get("name", "")
            c["arguments"] += d.get("function", {}).get("arguments", "")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_call_and_a_tool_result_answered(qwen):
    out = qwen.llm.create_chat_completion([SYSTEM, ASK], tools=[WEATHER], **_greedy())["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in out["message"]["tool_calls"]] == ["get_weather"]
    prompt = qwen.llm.render_chat(HISTORY, tools=[WEATHER])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt and \
        "<tool_response>\n23 C and sunny\n</tool_response>" in prompt
    reply = qwen.llm.create_chat_completion(HISTORY, tools=[WEATHER], tool_choice="none", **_greedy())
    assert "23" in reply["choices"][0]["message"]["content"]


# -- the real clients, against the server ----------------------------------------------------------------------------

def test_openai_client_tool_round_trip(qwen):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0)
    msgs = [SYSTEM, ASK]
    first = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], tool_choice="required",
                                           **_greedy())
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # the client's own message object goes back (with its null refusal, audio, ... fields), then the result
    msgs += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "23 C and sunny"}]
    answer = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], tool_choice="none",
                                            **_greedy())
    assert "23" in answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="m", messages=[SYSTEM, ASK], tools=[WEATHER],
                                            tool_choice="required", stream=True, **_greedy())
    deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].id.startswith("call_") and deltas[0][0].function.name == "get_weather"
    assert "".join(d[0].function.arguments or "" for d in deltas) == call.function.arguments


class Weather:
    """The structured output the clients ask for (a pydantic model, made when pydantic is there)."""

    @staticmethod
    def model():
        pydantic = pytest.importorskip("pydantic")

        class Weather(pydantic.BaseModel):
            city: str
            temperature_c: int
        return Weather


EXTRACT = "It is 23 degrees C in Paris today. Extract the weather."


def test_instructor_tools_mode(qwen):
    instructor = pytest.importorskip("instructor")
    openai = pytest.importorskip("openai")
    client = instructor.from_openai(openai.OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0))
    assert client.mode == instructor.Mode.TOOLS  # the default
    got = client.chat.completions.create(model="m", response_model=Weather.model(), max_retries=0,
                                         messages=[{"role": "user", "content": EXTRACT}], **_greedy())
    assert (got.city, got.temperature_c) == ("Paris", 23)


def test_langchain_bind_tools_round_trip(qwen):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "23 C and sunny"

    llm = lc.ChatOpenAI(base_url=qwen.url + "/v1", api_key="unused", model="m", temperature=0, max_tokens=60,
                        max_retries=0)
    msgs = [SystemMessage(SYSTEM["content"]), HumanMessage(ASK["content"])]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(msgs)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    msgs += [ai, get_weather.invoke(ai.tool_calls[0])]   # the ToolMessage with the call's id
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(msgs)
    assert "23" in final.content and not final.tool_calls
    got = llm.with_structured_output(Weather.model(), method="function_calling").invoke(EXTRACT)
    assert (got.city, got.temperature_c) == ("Paris", 23)


def test_pydantic_ai_tool_output(qwen):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("m", provider=OpenAIProvider(base_url=qwen.url + "/v1", api_key="unused"))
    agent = Agent(model, output_type=Weather.model(), model_settings={"temperature": 0, "max_tokens": 60})
    got = agent.run_sync(EXTRACT).output   # the default output mode: a tool call to final_result
    assert (got.city, got.temperature_c) == ("Paris", 23)


def test_llama_index_structured_predict(qwen):
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model="m", api_base=qwen.url + "/v1", api_key="unused", is_chat_model=True,
                     is_function_calling_model=True, temperature=0, max_tokens=60, max_retries=0)
    got = llm.structured_predict(Weather.model(), PromptTemplate("Extract the weather: {text}"),
                                 text="It is 23 degrees C in Paris today.")
    assert (got.city, got.temperature_c) == ("Paris", 23)
