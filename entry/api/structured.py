"""Structured output and tool calling: JSON schemas -> GBNF grammars, the generic tool prompt,
and tool calls read back out of generated text.

The entry does all schema work, so a node only ever sees GBNF text (protocol 2's
InferRequest.grammar) and a verifier replays under the same text.

Tool calls, in the format the generic prompt documents (also how earlier calls and tool
results are rendered back to the model in later turns):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

tool_choice "required" or a named function: a grammar allows only such blocks, with a name
from the list and arguments valid for that function's `parameters` (parallel_tool_calls: up to
one block per function offered, as small models repeat a call until max_tokens otherwise); "auto": the grammar allows
either such blocks or plain text that does not start with "<"; "none": no tools in the prompt
and no grammar.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from protocol.messages import MAX_GRAMMAR

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 64
MAX_SCHEMA_DEPTH = 32

# The converter (llama-cpp-python's json_schema_to_gbnf) does not enforce these: in strict
# mode a schema using them is refused, as OpenAI's strict mode refuses what it cannot enforce.
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties",
              "maxProperties", "uniqueItems", "not", "if", "then", "else", "patternProperties", "propertyNames",
              "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas",
              "unevaluatedProperties", "unevaluatedItems")
_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minimum", "maximum"),
           ("minProperties", "maxProperties"), ("minContains", "maxContains"))

# Any JSON object (json_object mode): llama.cpp's JSON grammar, whose root is an object.
JSON_OBJECT_GRAMMAR = JSON_GBNF


class SchemaProblem(ValueError):
    """A schema that is invalid, unsatisfiable or unsupported (the message says which)."""


def _walk(schema: Any, path: str, depth: int = 0):
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaProblem(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, dict):
        yield path, schema
        for k, v in schema.items():
            if k in ("enum", "const", "default", "examples", "description", "title"):
                continue
            if isinstance(v, (dict, list)):
                yield from _walk(v, f"{path}/{k}", depth + 1)
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _walk(v, f"{path}/{i}", depth + 1)


def _check_satisfiable(schema: Any, strict: bool) -> None:
    if schema is False:
        raise SchemaProblem("the schema `false` matches nothing")
    for path, node in _walk(schema, "#"):
        where = path or "#"
        for lo, hi in _BOUNDS:
            a, b = node.get(lo), node.get(hi)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
                raise SchemaProblem(f"unsatisfiable at {where}: {lo} {a} > {hi} {b}")
        for key in ("enum", "anyOf", "oneOf"):
            if key in node and node[key] == []:
                raise SchemaProblem(f"unsatisfiable at {where}: empty {key!r}")
        req, props = node.get("required"), node.get("properties")
        if isinstance(props, dict) and isinstance(req, list):
            bad = [k for k in req if props.get(k) is False]
            if bad:
                raise SchemaProblem(f"unsatisfiable at {where}: required property {bad[0]!r} is `false`")
        if node.get("additionalProperties") is False and isinstance(req, list):
            missing = [r for r in req if not isinstance(props, dict) or r not in props]
            if missing:
                raise SchemaProblem(f"unsatisfiable at {where}: required property {missing[0]!r} is not allowed "
                                    "(additionalProperties is false)")
        if strict:
            used = [k for k in UNENFORCED if k in node]
            if used:
                raise SchemaProblem(f"{used[0]!r} (at {where}) is not supported with strict: true; "
                                    "see README 'Structured output and tools'")


def schema_grammar(schema: Any, *, strict: bool = False) -> str:
    """GBNF whose strings are JSON documents valid for `schema` (keywords in UNENFORCED aside).
    Raises SchemaProblem."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaProblem("a JSON schema must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaProblem(f"invalid JSON schema: {e.message}") from None
    _check_satisfiable(schema, strict)
    if schema is True or schema == {}:
        return _ANY_VALUE_GRAMMAR
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise SchemaProblem("the schema is too deeply recursive") from None
    except Exception as e:  # the converter asserts on what it does not support
        raise SchemaProblem(f"unsupported JSON schema: {str(e)[:200] or type(e).__name__}") from None
    if re.search(r"^root ::=\s*$", grammar, re.M):
        raise SchemaProblem("the schema matches no JSON value")
    if len(grammar) > MAX_GRAMMAR:
        raise SchemaProblem(f"the schema makes a grammar of {len(grammar)} characters; at most {MAX_GRAMMAR}")
    return grammar


_ANY_VALUE_GRAMMAR = json_schema_to_gbnf(json.dumps({"type": ["object", "array", "string", "number", "boolean", "null"]}))


# --- tools -------------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict


def call_schema(tools: list[Tool]) -> dict:
    """The schema of one call's JSON: a name from the list and that function's arguments."""
    alts = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def tools_grammar(tools: list[Tool], *, parallel: bool, optional: bool) -> str:
    """GBNF for one call block (parallel: up to one per tool); optional: or plain text instead."""
    body = schema_grammar(call_schema(tools))
    # The converter's root becomes one call; our root wraps it in the block markers.
    body = re.sub(r"^root ::=", "tool-call-json ::=", body, count=1, flags=re.M)
    block = f'"{CALL_OPEN}\\n" tool-call-json "\\n{CALL_CLOSE}"'
    # Parallel calls are capped at one per function offered: small models otherwise repeat the
    # same call until max_tokens (seen with SmolLM2), and the cap still allows one call to each.
    extra = len(tools) - 1 if parallel else 0
    calls = f"{block} (\"\\n\" {block}){{0,{extra}}}" if extra > 0 else block
    lines = [f"tool-calls ::= {calls}", body]
    if optional:
        # Text must not open with "<", so that a "<" always starts a well-formed call.
        lines.append('plain-text ::= [^<] [^\\x00]*')
        lines.insert(0, "root ::= tool-calls | plain-text")
    else:
        lines.insert(0, "root ::= tool-calls")
    grammar = "\n".join(lines)
    if len(grammar) > MAX_GRAMMAR:
        raise SchemaProblem(f"the tools make a grammar of {len(grammar)} characters; at most {MAX_GRAMMAR}")
    return grammar


def tools_prompt(tools: list[Tool], choice: str | None) -> str:
    """The generic system-prompt block that lists the functions and the exact call format.
    choice: "auto", "required", or the one function's name."""
    listing = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools],
                         ensure_ascii=False)
    if choice == "auto":
        rule = "If a function helps, call it; otherwise answer in plain text."
    elif choice == "required":
        rule = "You must call one of these functions."
    else:
        rule = f"You must call the function {choice!r}."
    return (f"You can call these functions:\n{listing}\n{rule} To call a function, answer with exactly:\n"
            f"{CALL_OPEN}\n{{\"name\": \"<function name>\", \"arguments\": <JSON object of arguments>}}\n{CALL_CLOSE}")


def render_call(name: str, arguments: str) -> str:
    """An earlier call, as the model should have written it."""
    try:
        args: Any = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        args = arguments
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CALL_CLOSE}"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls in `text` when it is nothing but well-formed call blocks naming known
    functions; None when it is an ordinary answer (or a malformed, unfinished call)."""
    if not text.lstrip().startswith(CALL_OPEN):
        return None
    calls, pos = [], 0
    stripped = text.strip()
    for m in _CALL_RE.finditer(stripped):
        if stripped[pos:m.start()].strip():
            return None
        pos = m.end()
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return None
        if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments"), dict)):
            return None
        call = ToolCall(new_call_id(), obj["name"], json.dumps(obj["arguments"], ensure_ascii=False))
        if not any((c.name, c.arguments) == (call.name, call.arguments) for c in calls):  # a repeat does nothing new
            calls.append(call)
    if not calls or stripped[pos:].strip():
        return None
    return calls
