"""Make models/tiny-gptoss-harmony: the bundled tiny-gptoss-pycode taught OpenAI's harmony chat format.

What it does, offline and on CPU:
  1. extends tiny-gptoss-pycode's byte-level BPE tokenizer by harmony's special tokens (<|start|>, <|end|>,
     <|message|>, <|channel|>, <|constrain|>, <|return|>, <|call|>; the existing ids are kept), resizes the
     embeddings and the LM head (new rows: the mean of the old rows plus a little seeded noise), and installs
     gpt-oss's own chat template (tests/data/gpt_oss_chat_template.jinja, as chat_template.jinja);
  2. generates synthetic conversations, renders each prompt THROUGH THAT TEMPLATE (microscale's renderer, which the
     tests hold equal to transformers', with `tools=[...]` in OpenAI format) and appends what gpt-oss emits:
       plain question -> <|channel|>analysis<|message|>..<|end|><|start|>assistant<|channel|>final<|message|>..
                         <|return|>
       tool request   -> <|channel|>analysis<|message|>..<|end|><|start|>assistant<|channel|>commentary
                         to=functions.NAME <|constrain|>json<|message|>{..}<|call|>
       tool result    -> analysis, then a final answer that uses the result;
  3. fine-tunes all weights with the loss on the completion tokens only (AdamW, warmup + cosine), one thread;
  4. saves bfloat16 safetensors, tokenizer files, generation_config.json (stops on <|return|>, <|endoftext|>,
     <|call|>, as gpt-oss does), then measures with microscale on held-out conversations (greedy, tools in the
     prompt) and writes the model card README.md.

Re-run (about 35 minutes on one core; every seed fixed, so the same data and, on the same torch build, the same
weights):
    HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/train_harmony_model.py
    PYTHONPATH=. python tools/train_harmony_model.py --eval-only      # measure an existing folder again
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "models" / "tiny-gptoss-pycode"
OUT = REPO / "models" / "tiny-gptoss-harmony"
TEMPLATE = REPO / "tests" / "data" / "gpt_oss_chat_template.jinja"
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
SEED = 1234
EVAL_SEED = 98765

# ---------------------------------------------------------------------------------------------------------------
# Tools: OpenAI function definitions, a user request generator, a fake result, an answer that uses the result.
# ---------------------------------------------------------------------------------------------------------------
CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Oslo", "Stockholm",
    "Helsinki", "Copenhagen", "Dublin", "Amsterdam", "Brussels", "Zurich", "Geneva", "Athens", "Istanbul", "Cairo",
    "Nairobi", "Lagos", "Cape Town", "Tokyo", "Osaka", "Seoul", "Beijing", "Shanghai", "Hong Kong", "Singapore",
    "Bangkok", "Hanoi", "Jakarta", "Manila", "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver",
    "New York", "Boston", "Chicago", "Denver", "Seattle", "San Francisco", "Los Angeles", "Austin", "Miami",
    "Mexico City", "Lima", "Bogota", "Santiago", "Buenos Aires", "Sao Paulo", "Reykjavik", "Mumbai", "Delhi",
    "Dubai", "Tel Aviv", "Marseille", "Lyon", "Hamburg", "Munich", "Naples", "Krakow", "Porto", "Seville", "Bergen",
]
TIMEZONES = [
    "Europe/Paris", "Europe/London", "Europe/Berlin", "America/New_York", "America/Chicago", "America/Denver",
    "America/Los_Angeles", "Asia/Tokyo", "Asia/Kolkata", "Asia/Singapore", "Australia/Sydney", "Africa/Cairo",
    "America/Sao_Paulo", "Pacific/Auckland", "Asia/Dubai", "Europe/Moscow", "UTC", "Asia/Seoul", "Europe/Madrid",
]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "SEK", "NOK", "MXN", "BRL"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear"]
TOPICS = [
    "python", "rust", "linux", "pizza", "jazz", "chess", "gardening", "bicycles", "coffee", "volcanoes", "sharks",
    "solar panels", "tea", "football", "opera", "origami", "robots", "the moon", "bread", "kites", "tennis",
]
QUALIFIERS = [
    "history of", "best books about", "how to learn", "news about", "cheap", "recipes with", "facts about",
    "beginner guide to", "museums about", "videos of", "tips for",
]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
DOMAINS = ["example.com", "mail.org", "work.net", "school.edu"]
SUBJECTS = ["Meeting tomorrow", "Lunch", "Project update", "Invoice", "Hello", "Weekend plans", "Report", "Tickets"]


def _number(rng: random.Random) -> int | float:
    kind = rng.random()
    if kind < 0.6:
        return rng.randint(0, 999)
    if kind < 0.8:
        return rng.randint(1000, 99999)
    if kind < 0.9:
        return -rng.randint(1, 500)
    return round(rng.uniform(0, 100), rng.choice([1, 2]))


def _fmt(x: float) -> str:
    return json.dumps(x)


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


@dataclass
class Tool:
    spec: dict
    request: Callable[[random.Random], tuple[str, dict]]  # -> user text, the call's arguments
    result: Callable[[random.Random, dict], dict]
    answer: Callable[[dict, dict], str]

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


def _weather_request(rng: random.Random) -> tuple[str, dict]:
    city = rng.choice(CITIES)
    if rng.random() < 0.35:
        unit = rng.choice(["celsius", "fahrenheit"])
        text = rng.choice([
            "What's the weather in {c} in {u}?", "Tell me the temperature in {c} in {u}.",
            "How warm is it in {c}? Answer in {u}.", "Weather for {c} please, in {u}.",
        ]).format(c=city, u=unit)
        return text, {"city": city, "unit": unit}
    text = rng.choice([
        "What's the weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
        "Weather in {c}?", "Tell me the current weather for {c}.", "Do I need an umbrella in {c} today?",
        "How hot is it in {c} right now?",
    ]).format(c=city)
    return text, {"city": city}


def _binary_request(templates: list[str]) -> Callable[[random.Random], tuple[str, dict]]:
    def request(rng: random.Random) -> tuple[str, dict]:
        a, b = _number(rng), _number(rng)
        return rng.choice(templates).format(a=_fmt(a), b=_fmt(b)), {"a": a, "b": b}
    return request


def _search_request(rng: random.Random) -> tuple[str, dict]:
    query = f"{rng.choice(QUALIFIERS)} {rng.choice(TOPICS)}"
    text = rng.choice([
        "Search the web for {q}.", "Look up {q}.", "Find information on {q}.", 'Can you search for "{q}"?',
        "Please do a web search: {q}", "Search {q} for me.",
    ]).format(q=query)
    return text, {"query": query}


def _time_request(rng: random.Random) -> tuple[str, dict]:
    tz = rng.choice(TIMEZONES)
    text = rng.choice([
        "What time is it in {t}?", "Current time in the {t} timezone?", "Tell me the time in {t}.",
        "What's the local time for {t}?",
    ]).format(t=tz)
    return text, {"timezone": tz}


def _currency_request(rng: random.Random) -> tuple[str, dict]:
    amount = rng.choice([rng.randint(1, 5000), round(rng.uniform(1, 500), 2)])
    src, dst = rng.sample(CURRENCIES, 2)
    text = rng.choice([
        "Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "What are {a} {s} worth in {d}?",
        "Exchange {a} {s} into {d} please.",
    ]).format(a=_fmt(amount), s=src, d=dst)
    return text, {"amount": amount, "from_currency": src, "to_currency": dst}


def _stock_request(rng: random.Random) -> tuple[str, dict]:
    symbol = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 4)))
    text = rng.choice([
        "What is the stock price of {s}?", "Quote for {s}?", "How much does one share of {s} cost?",
        "Get me the latest price of {s} stock.",
    ]).format(s=symbol)
    return text, {"symbol": symbol}


def _email_request(rng: random.Random) -> tuple[str, dict]:
    to = f"{rng.choice(NAMES)}@{rng.choice(DOMAINS)}"
    subject = rng.choice(SUBJECTS)
    text = rng.choice([
        'Send an email to {t} with the subject "{s}".', 'Email {t}, subject "{s}".',
        'Please write to {t} with subject "{s}".',
    ]).format(t=to, s=subject)
    return text, {"to": to, "subject": subject}


def _weather_result(rng: random.Random, args: dict) -> dict:
    unit = args.get("unit", "celsius")
    temp = rng.randint(-10, 35) if unit == "celsius" else rng.randint(14, 95)
    return {"temperature": temp, "unit": unit, "sky": rng.choice(SKIES)}


def _quote(rng: random.Random, args: dict) -> dict:
    return {"price": round(rng.uniform(1, 900), 2), "currency": "USD"}


def _search_result(rng: random.Random, args: dict) -> dict:
    slug = args["query"].replace(" ", "-")
    return {"results": [{"title": args["query"].capitalize(), "url": f"https://{rng.choice(DOMAINS)}/{slug}"}]}


def _time_result(rng: random.Random, args: dict) -> dict:
    return {"time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", "timezone": args["timezone"]}


def _number_result(op: Callable[[float, float], float]) -> Callable[[random.Random, dict], dict]:
    return lambda rng, args: {"result": round(op(args["a"], args["b"]), 4)}


NUMBER = {"type": "number"}
TOOLS = [
    Tool(_fn("get_weather", "Get the current weather in a city.", {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}, ["city"]),
        _weather_request, _weather_result,
        lambda a, r: f"It is {r['temperature']} degrees {r['unit']} and {r['sky']} in {a['city']}."),
    Tool(_fn("add", "Add two numbers.", {"a": NUMBER, "b": NUMBER}, ["a", "b"]),
         _binary_request(["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                          "What do you get if you add {a} to {b}?", "{a} plus {b}?"]),
         _number_result(lambda a, b: a + b), lambda a, r: f"{_fmt(a['a'])} + {_fmt(a['b'])} = {_fmt(r['result'])}."),
    Tool(_fn("multiply", "Multiply two numbers.", {"a": NUMBER, "b": NUMBER}, ["a", "b"]),
         _binary_request(["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}.",
                          "{a} * {b} = ?"]),
         _number_result(lambda a, b: a * b), lambda a, r: f"{_fmt(a['a'])} * {_fmt(a['b'])} = {_fmt(r['result'])}."),
    Tool(_fn("search", "Search the web.", {"query": {"type": "string", "description": "What to search for"}},
             ["query"]),
         _search_request, _search_result,
         lambda a, r: f"The top result is \"{r['results'][0]['title']}\": {r['results'][0]['url']}"),
    Tool(_fn("get_time", "Get the current time in a timezone.", {
        "timezone": {"type": "string", "description": "IANA timezone name"}}, ["timezone"]),
        _time_request, _time_result, lambda a, r: f"It is {r['time']} in {a['timezone']}."),
    Tool(_fn("convert_currency", "Convert an amount of money between currencies.", {
        "amount": NUMBER, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
        ["amount", "from_currency", "to_currency"]),
        _currency_request, lambda rng, a: {"amount": round(a["amount"] * rng.uniform(0.2, 3), 2)},
        lambda a, r: f"{_fmt(a['amount'])} {a['from_currency']} is {_fmt(r['amount'])} {a['to_currency']}."),
    Tool(_fn("get_stock_price", "Get the latest price of a stock.", {
        "symbol": {"type": "string", "description": "Ticker symbol"}}, ["symbol"]),
        _stock_request, _quote, lambda a, r: f"{a['symbol']} trades at {_fmt(r['price'])} {r['currency']}."),
    Tool(_fn("send_email", "Send an email.", {
        "to": {"type": "string", "description": "Recipient address"}, "subject": {"type": "string"}},
        ["to", "subject"]),
        _email_request, lambda rng, a: {"status": "sent"}, lambda a, r: f"Done: the email to {a['to']} was sent."),
]
TOOLS_BY_NAME = {t.name: t for t in TOOLS}

# ---------------------------------------------------------------------------------------------------------------
# Plain questions: (user text, short reasoning, final answer, names of tools that would answer it)
# ---------------------------------------------------------------------------------------------------------------
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Austria": "Vienna", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi", "China": "Beijing", "Australia": "Canberra",
    "Brazil": "Brasilia", "Mexico": "Mexico City", "Finland": "Helsinki", "Denmark": "Copenhagen",
}
WORDS = ["apple", "river", "python", "garden", "planet", "window", "silver", "rocket", "banana", "castle", "tiger",
         "purple", "coffee", "winter", "dragon", "pencil", "guitar", "forest", "orange", "bridge"]
GREETINGS = [
    ("Hi!", "Hello! How can I help you today?"), ("Hello, who are you?", "I am a small assistant. How can I help?"),
    ("Good morning.", "Good morning! What can I do for you?"), ("Thanks!", "You are welcome."),
    ("How are you?", "I am fine, thank you. How can I help?"),
    ("Tell me a joke.", "Why did the robot nap? To recharge."),
]


def plain_question(rng: random.Random) -> tuple[str, str, str, set[str]]:
    kind = rng.random()
    if kind < 0.25:
        country = rng.choice(list(CAPITALS))
        capital = CAPITALS[country]
        text = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                           "Name the capital of {c}."]).format(c=country)
        return text, f"The user asks for the capital of {country}. It is {capital}.", \
            f"The capital of {country} is {capital}.", set()
    if kind < 0.45:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            text = rng.choice(["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."]).format(a=a, b=b)
            return text, f"Simple sum: {a} + {b} = {a + b}.", f"{a} + {b} = {a + b}.", {"add"}
        text = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}."]).format(a=a, b=b)
        return text, f"Simple product: {a} * {b} = {a * b}.", f"{a} * {b} = {a * b}.", {"multiply"}
    if kind < 0.75:
        word = rng.choice(WORDS)
        task = rng.randrange(3)
        if task == 0:
            return f"Spell {word} backwards.", f"Reverse the letters of {word}.", word[::-1], set()
        if task == 1:
            return (f"How many letters are in the word {word}?", f"Count the letters of {word}: {len(word)}.",
                    f"The word {word} has {len(word)} letters.", set())
        return f"Write {word} in capital letters.", f"Uppercase {word}.", word.upper(), set()
    greeting, reply = rng.choice(GREETINGS)
    return greeting, "The user is chatting. A short friendly reply is enough.", reply, set()


# ---------------------------------------------------------------------------------------------------------------
# Conversations rendered through the chat template
# ---------------------------------------------------------------------------------------------------------------
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "Use the tools when they help.",
                  "You are a friendly assistant. Be concise."]


@dataclass
class Example:
    kind: str  # "call", "result", "plain", "plain_with_tools"
    messages: list[dict]
    tools: list[dict] | None
    render_kwargs: dict
    completion: str
    expected_call: tuple[str, dict] | None = None


def analysis(text: str) -> str:
    return f"<|channel|>analysis<|message|>{text}<|end|><|start|>assistant"


def tool_call_completion(reasoning: str, name: str, args: dict) -> str:
    """What gpt-oss emits for a function call (recipient after the channel, json constraint)."""
    arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    header = f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
    return f"{analysis(reasoning)}{header}{arguments}<|call|>"


def final_completion(reasoning: str, answer: str) -> str:
    return f"{analysis(reasoning)}<|channel|>final<|message|>{answer}<|return|>"


def _render_kwargs(rng: random.Random) -> dict:
    day = date(2024, 1, 1) + timedelta(days=rng.randrange(900))
    kwargs: dict[str, Any] = {"strftime_now": day.strftime}
    if rng.random() < 0.4:
        kwargs["reasoning_effort"] = rng.choice(["low", "medium", "high"])
    return kwargs


def _history(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": rng.choice(["system", "developer"]), "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.15:
        question, _, answer, _ = plain_question(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _offered(rng: random.Random, must: Tool | None, avoid: set[str]) -> list[Tool]:
    others = [t for t in TOOLS if t is not must and t.name not in avoid]
    tools = rng.sample(others, rng.randint(0 if must else 1, 3)) + ([must] if must else [])
    rng.shuffle(tools)
    return tools


def make_example(rng: random.Random, kind: str) -> Example:
    messages = _history(rng)
    kwargs = _render_kwargs(rng)
    if kind in ("plain", "plain_with_tools"):
        question, reasoning, answer, fitting = plain_question(rng)
        tools = _offered(rng, None, fitting) if kind == "plain_with_tools" else []
        if tools:
            reasoning += " No tool is needed."
        messages.append({"role": "user", "content": question})
        return Example(kind, messages, [t.spec for t in tools] or None, kwargs, final_completion(reasoning, answer))
    tool = rng.choice(TOOLS)
    tools = _offered(rng, tool, set())
    text, args = tool.request(rng)
    reasoning = f"The user asks: {text} I will call {tool.name}."
    messages.append({"role": "user", "content": text})
    specs = [t.spec for t in tools]
    if kind == "call":
        return Example(kind, messages, specs, kwargs, tool_call_completion(reasoning, tool.name, args),
                       (tool.name, args))
    call = {"role": "assistant", "tool_calls": [{"id": f"call_{rng.randrange(10**8)}", "type": "function",
                                                  "function": {"name": tool.name, "arguments": args}}]}
    if rng.random() < 0.5:
        call["thinking"] = reasoning
    result = tool.result(rng, args)
    messages += [call, {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}]
    return Example(kind, messages, specs, kwargs,
                   final_completion(f"{tool.name} returned its result.", tool.answer(args, result)))


KINDS = (("call", 0.4), ("result", 0.25), ("plain", 0.2), ("plain_with_tools", 0.15))


def make_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    kinds = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS], k=n)
    return [make_example(rng, kind) for kind in kinds]


def render_prompt(tokenizer, example: Example) -> str:
    return tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tools=example.tools,
                                         **example.render_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Model folder: tokenizer, resized weights, config files
# ---------------------------------------------------------------------------------------------------------------
def build_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(BASE / "tokenizer.json"))
    base_size = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_TOKENS])
    ids = {t: tok.token_to_id(t) for t in HARMONY_TOKENS}
    assert sorted(ids.values()) == list(range(base_size, base_size + len(HARMONY_TOKENS))), ids
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((BASE / "tokenizer_config.json").read_text())
    del config["chat_template"]  # gpt-oss keeps its template in chat_template.jinja
    for token, i in ids.items():
        config["added_tokens_decoder"][str(i)] = {"content": token, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *HARMONY_TOKENS]}
    config.update(special)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(TEMPLATE.read_text())
    return ids


def resized_base_model(vocab_size: int, seed: int):
    """tiny-gptoss-pycode in float32 with `vocab_size` rows; a new row is the mean of the old rows (so the new
    tokens start as an 'average' token) plus noise at 1% of the rows' spread (so they are not identical)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    old = model.config.vocab_size
    emb, head = model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data

    def grown(weight: torch.Tensor) -> torch.Tensor:
        new = weight.mean(0, keepdim=True) + 0.01 * weight.std(0, keepdim=True) * torch.randn(
            vocab_size - old, weight.shape[1], generator=gen)
        return torch.cat([weight, new])

    new_emb, new_head = grown(emb), grown(head)
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.get_input_embeddings().weight.data.copy_(new_emb)
    model.get_output_embeddings().weight.data.copy_(new_head)
    assert model.config.vocab_size == vocab_size
    return model


def save_model(model, out: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    model.config.output_router_logits = False
    model.config.use_cache = True
    model.config.eos_token_id = ids["<|return|>"]
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    # As the base: transformers 5 writes rope_parameters; keep the legacy rope_theta / rope_scaling keys too.
    path = out / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config["rope_parameters"])
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # gpt-oss stops on <|return|>, <|endoftext|> and <|call|> (200002, 199999, 200012).
    GenerationConfig(bos_token_id=0, pad_token_id=0, do_sample=False,
                     eos_token_id=[ids["<|return|>"], 0, ids["<|call|>"]]).save_pretrained(out)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def encode_examples(tokenizer, examples: list[Example], max_len: int) -> list[tuple[list[int], int]]:
    """(prompt + completion ids, prompt length). Prompt and completion are tokenized apart, as the server sees
    them: the prompt by itself, the completion token by token."""
    encoded = []
    for example in examples:
        prompt = tokenizer.encode(render_prompt(tokenizer, example), add_special_tokens=False)
        completion = tokenizer.encode(example.completion, add_special_tokens=False)
        if len(prompt) + len(completion) <= max_len:
            encoded.append((prompt + completion, len(prompt)))
    return encoded


def batches(encoded: list[tuple[list[int], int]], max_tokens: int, rng: random.Random):
    """Endless shuffled batches of similar length, at most max_tokens padded tokens each."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(encoded[i][0]) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    while True:
        rng.shuffle(groups)
        for group in groups:
            width = max(len(encoded[i][0]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for row, i in enumerate(group):
                seq, prompt_len = encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                labels[row, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
            yield ids, labels


def lr_at(progress: float, peak: float, warmup: float, min_ratio: float) -> float:
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    p = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(model, encoded, args) -> dict:
    torch.manual_seed(SEED + 1)
    stream = batches(encoded, args.batch_tokens, random.Random(SEED + 2))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    t0, ema, seen, log = time.time(), None, 0, []
    for step in range(1, args.steps + 1):
        lr = lr_at((step - 1) / args.steps, args.lr, 0.05, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = next(stream)
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        lm_loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        loss = lm_loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += int((labels != -100).sum())
        ema = lm_loss.item() if ema is None else 0.95 * ema + 0.05 * lm_loss.item()
        if step % 25 == 0 or step == 1:
            elapsed = time.time() - t0
            log.append({"step": step, "loss_ema": round(ema, 4), "minutes": round(elapsed / 60, 2)})
            print(f"step {step}/{args.steps} loss {lm_loss.item():.4f} ema {ema:.4f} lr {lr:.2e} "
                  f"completion tokens {seen:,} {elapsed / 60:.1f} min", flush=True)
    model.eval()
    return {"steps": args.steps, "loss_ema": ema, "minutes": (time.time() - t0) / 60, "completion_tokens": seen,
            "log": log}


# ---------------------------------------------------------------------------------------------------------------
# Measurement (microscale, greedy, the saved bfloat16 folder)
# ---------------------------------------------------------------------------------------------------------------
CALL = re.compile(
    r"<\|channel\|>commentary to=functions\.([\w.-]+) ?(?:<\|constrain\|>json)?<\|message\|>(.*?)<\|call\|>$",
    re.DOTALL)
FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)<\|return\|>$", re.DOTALL)


def parse_call(text: str) -> tuple[str, Any] | None:
    """The function name and the parsed JSON arguments of a completion that ends in a harmony tool call."""
    match = CALL.search(text)
    if match is None:
        return None
    try:
        return match.group(1), json.loads(match.group(2))
    except json.JSONDecodeError:
        return match.group(1), None


def measure(out: Path, n: int, max_tokens: int) -> dict:
    from microscale import LLM, SamplingParams
    from microscale.serve.tool_parsers.harmony import HarmonyParser

    llm = LLM(str(out), dtype="float32", max_model_len=1024, max_num_seqs=16)
    tokenizer = llm.get_tokenizer()
    pool = make_examples(8 * n, EVAL_SEED)
    sets = {kind: [e for e in pool if e.kind == kind][:n] for kind, _ in KINDS}
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    report: dict[str, Any] = {"n": n}
    samples = {}
    for kind, examples in sets.items():
        prompts = [{"prompt_token_ids": tokenizer.encode(render_prompt(tokenizer, e), add_special_tokens=False)}
                   for e in examples]
        outs = llm.generate(prompts, params, use_tqdm=False)
        texts = [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=False) for o in outs]
        samples[kind] = texts[:2]
        if kind == "call":
            calls = [parse_call(t) for t in texts]
            report["call_wellformed"] = sum(c is not None for c in calls) / n
            report["call_right_name_json"] = sum(
                c is not None and c[0] == e.expected_call[0] and isinstance(c[1], dict)
                for c, e in zip(calls, examples)) / n
            report["call_exact_args"] = sum(c is not None and tuple(c) == e.expected_call
                                            for c, e in zip(calls, examples)) / n
        else:
            finals = [FINAL.search(t) for t in texts]
            report[f"{kind}_final"] = sum(f is not None for f in finals) / n
            report[f"{kind}_exact"] = sum(
                f is not None and e.completion.endswith(f"<|message|>{f.group(1)}<|return|>")
                for f, e in zip(finals, examples)) / n
            # microscale's own split: reasoning = the analysis message, content = the final message.
            parser = HarmonyParser(tokenizer)
            splits = [parser.parse(o.outputs[0].text, o.outputs[0].token_ids, True) for o in outs]
            report[f"{kind}_split_ok"] = sum(
                f is not None and s.content == f.group(1) and s.reasoning and "<|" not in s.reasoning
                for f, s in zip(finals, splits)) / n
    report["samples"] = samples
    report["tool_prompt_example"] = render_prompt(tokenizer, sets["call"][0])
    return report


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------
def write_card(out: Path, ids: dict[str, int], data: dict, stats: dict, report: dict, args) -> None:
    pct = {k: f"{100 * v:.0f}%" for k, v in report.items() if isinstance(v, float)}
    size = (out / "model.safetensors").stat().st_size / 2**20
    params = report["param_count"]
    samples = "\n\n".join(
        f"{kind}:\n```\n{text}\n```" for kind, texts in report["samples"].items() for text in texts[:1])
    three = "{result} / {plain} / {plain_with_tools}"
    rows = [
        ("tool requests: well-formed harmony call (`…to=functions.NAME <|constrain|>json<|message|>…<|call|>`)",
         pct["call_wellformed"]),
        ("tool requests: right function name and arguments that parse as a JSON object", pct["call_right_name_json"]),
        ("tool requests: arguments exactly right", pct["call_exact_args"]),
        ("tool results in the prompt: ends in a final-channel answer (`<|return|>`)", pct["result_final"]),
        ("plain questions, no tools: ends in a final-channel answer", pct["plain_final"]),
        ("plain questions, tools offered: ends in a final-channel answer (no call)", pct["plain_with_tools_final"]),
        ("final answers exactly right (tool result / plain / plain with tools)",
         three.format(**{k: pct[f"{k}_exact"] for k in ("result", "plain", "plain_with_tools")})),
        ("microscale's `HarmonyParser` gives the analysis as reasoning and the final as content "
         "(result / plain / plain with tools)",
         three.format(**{k: pct[f"{k}_split_ok"] for k in ("result", "plain", "plain_with_tools")})),
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    curve = ", ".join(f"{p['step']}: {p['loss_ema']}" for p in stats["log"][:: max(1, len(stats["log"]) // 8)])
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [tiny, test-model, gpt-oss, harmony, tool-calling]
---

# tiny-gptoss-harmony

A ~9M-parameter `GptOssForCausalLM` that speaks OpenAI's **harmony** format: gpt-oss's chat template, harmony's
special tokens, `analysis`/`final` channels and function calls on the `commentary` channel. It is
`tiny-gptoss-pycode` (same architecture and weights, see its model card) fine-tuned for {stats['minutes']:.0f}
minutes on one CPU core on synthetic conversations. It is a **test model** for serving code (chat template, harmony
parsing, tool calls, reasoning split): the structure of its replies is right most of the time, their content is
often wrong.

## How it was made
`tools/train_harmony_model.py` (re-run: `HF_HUB_OFFLINE=1 PYTHONPATH=. python tools/train_harmony_model.py`).

- **Tokenizer**: the base's 4096-token byte-level BPE plus harmony's special tokens, ids kept:
  {", ".join(f"`{t}` {i}" for t, i in ids.items())} (vocab_size {args.vocab_size}). `eos_token` `<|return|>`,
  `pad_token`/`bos_token` `<|endoftext|>` (0). `<|im_start|>`/`<|im_end|>` (1, 2) remain, untrained.
- **Chat template**: gpt-oss's own (`chat_template.jinja`, the file of openai/gpt-oss-20b; tests/data has the copy).
- **generation_config.json** stops on `<|return|>`, `<|endoftext|>`, `<|call|>` ({ids['<|return|>']}, 0,
  {ids['<|call|>']}), as gpt-oss does on 200002, 199999, 200012.
- **Weights**: the base's, embeddings and LM head grown by 7 rows (the mean of the old rows + 1% noise), then all
  weights fine-tuned. {params:,} parameters in bfloat16 (`model.safetensors`, {size:.1f} MiB).
- **Data**: {data['examples']:,} generated conversations ({data['kinds']}), prompts rendered through the chat template
  with `tools=[...]` in OpenAI format (1-4 of 8 tools offered: get_weather, add, multiply, search, get_time,
  convert_currency, get_stock_price, send_email; random dates, reasoning efforts, system/developer messages and
  earlier turns), completions as gpt-oss writes them:
  - plain question: `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`
  - tool request: `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>commentary to=functions.NAME
    <|constrain|>json<|message|>{{…}}<|call|>` (compact JSON with the values from the user's message)
  - tool result (the call as the template renders it, then `role: "tool"`): analysis, then a final answer that
    uses the result.
  Tools are offered with questions no offered tool answers, too (then the answer is direct). {data['tokens']:,}
  tokens, {data['completion_tokens']:,} of them completion tokens (the only ones with a loss).
- **Training**: AdamW (betas 0.9/0.95, wd 0.1 on matrices), peak LR {args.lr}, 5% warmup then cosine to 10%, clip 1.0,
  batches of ≤ {args.batch_tokens} padded tokens, router aux loss 0.05; {stats['steps']} steps,
  {stats['completion_tokens']:,} completion tokens seen, {stats['minutes']:.1f} min (torch.set_num_threads(1)).
  Completion loss (EMA) by step: {curve}; final {stats['loss_ema']:.4f}.

## Measured (held-out generated conversations, greedy, microscale, float32 compute on the bfloat16 weights)
{report['n']} of each kind, tools in the prompt (as `tool_choice="auto"` renders them), up to {args.eval_max_tokens}
new tokens:

| | |
| --- | --- |
{table}

Re-measure: `PYTHONPATH=. python tools/train_harmony_model.py --eval-only`.

## Sample outputs (special tokens kept)
{samples}

## Caveats
The content is learned from a small synthetic world: arithmetic and unseen facts are often wrong, and requests
unlike the generated ones get unpredictable replies. The template renders an earlier call as
`<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>` (as gpt-oss's template does) while the
model writes `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` (as gpt-oss does). Tool-call
`arguments` were rendered as JSON objects (the template `tojson`s them; a JSON *string* would be quoted twice).
The analysis message repeats the user's request, so a call takes 50-90 tokens; give it room (`max_tokens` ≥ 128).
Values are copied imperfectly (digits and letters dropped or swapped: `{"city":"New Kong"}` for New York), and
whether a tool is needed is learned from the phrasing: "What is 12 + 30?" gets a direct (wrong) answer even with
`add` offered, because small sums were plain questions in the data.
"""
    (out / "README.md").write_text(card)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--examples", type=int, default=6000, help="generated training conversations")
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--eval-max-tokens", type=int, default=128)
    ap.add_argument("--eval-only", action="store_true", help="measure the saved folder, train nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from microscale.tokenizer import Tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        report = measure(args.out, args.eval_n, args.eval_max_tokens)
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    random.seed(SEED)
    torch.manual_seed(SEED)
    ids = build_tokenizer(args.out)
    args.vocab_size = max(ids.values()) + 1
    tokenizer = Tokenizer.from_pretrained(args.out)
    examples = make_examples(args.examples, SEED)
    encoded = encode_examples(tokenizer, examples, args.max_len)
    kinds = {k: sum(e.kind == k for e in examples) for k, _ in KINDS}
    data = {"examples": len(encoded), "kinds": ", ".join(f"{v:,} {k}" for k, v in kinds.items()),
            "tokens": sum(len(s) for s, _ in encoded), "completion_tokens": sum(len(s) - p for s, p in encoded)}
    print(json.dumps(data), flush=True)
    model = resized_base_model(args.vocab_size, SEED)
    stats = train(model, encoded, args)
    save_model(model, args.out, ids)
    report = measure(args.out, args.eval_n, args.eval_max_tokens)
    report["param_count"] = sum(p.numel() for p in model.parameters())
    print(json.dumps({k: v for k, v in report.items() if k != "tool_prompt_example"}, indent=2, ensure_ascii=False))
    write_card(args.out, ids, data, stats, report, args)


if __name__ == "__main__":
    main()
