"""``python -m examples.agent``: an agent loop parks at each tool call; this script runs the tools.

``run_agent`` (:mod:`examples.agent.app`) decides its next action with a
scripted stand-in for an LLM. For a tool call it parks with the call, as
JSON, in its prompt. This script is the tool runner: it waits for the agent
to park, reads the call from the prompt, runs the tool and resumes the
suspension with the tool's result; the agent re-runs, replays what it
already knew, and decides again, until it returns a final answer.

The prompt is clear metadata (listed by ``celery persist list``, sent in
events): fine for a weather query; a call with secret arguments would carry
a reference instead, or reach the runner through ``notify=``.

Checks at the end: the answer, one suspension per tool call, and that the
policy ran once per decision even though the task executed once per tool
result (its decisions were checkpointed and replayed).
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from typing import Any

from examples._embedded import Run, main, next_suspension
from examples.agent.app import persist, run_agent

GOAL = "Shall we have a picnic in Paris on Saturday? Give the temperature in Fahrenheit."

_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def calculator(expression: str) -> float:
    """Arithmetic on numbers with + - * / and parentheses; nothing else is evaluated."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported expression: {expression!r}")

    return round(ev(ast.parse(expression, mode="eval")), 4)


def weather(city: str, day: str) -> dict[str, Any]:
    forecasts = {("Paris", "saturday"): {"summary": "sunny spells", "temp_c": 22.5, "rain_probability": 0.1}}
    return forecasts.get((city, day), {"summary": "unknown", "temp_c": 15.0, "rain_probability": 0.9})


def find_parks(city: str) -> list[dict[str, Any]]:
    parks = {"Paris": [{"name": "Parc des Buttes-Chaumont", "rating": 4.7}, {"name": "Jardin du Luxembourg", "rating": 4.6}]}
    return parks.get(city, [])


TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "weather": weather, "find_parks": find_parks}


def body(run: Run) -> None:
    run.worker()
    result = run_agent.delay(GOAL)
    run.say(f"agent task {result.id}: {GOAL!r}")
    seen: set[str] = set()
    calls = 0
    while (parked := next_suspension(result, seen)) is not None:
        key, info = parked
        call = json.loads(info["prompt"])
        output = TOOLS[call["tool"]](**call["args"])
        calls += 1
        run.say(f"step {calls}: agent parked ({persist.load(key).fingerprint}) asking {call['tool']}({call['args']})")
        run.say(f"        tool runner answers {output}")
        persist.resume(key, output)
    outcome = result.get(timeout=30)
    run.say(f"answer: {outcome['answer']}")
    run.say(
        f"{outcome['tool_calls']} tool calls, {outcome['executions']} executions of the task, "
        f"{outcome['policy_calls']} policy calls (decisions replayed from the checkpoint, never re-asked)"
    )
    if calls != 3 or outcome["tool_calls"] != 3 or outcome["executions"] != 4 or outcome["policy_calls"] != 4:
        raise RuntimeError(f"unexpected run: {calls} calls answered, {outcome}")
    if "72.5 F" not in outcome["answer"] or "Buttes-Chaumont" not in outcome["answer"]:
        raise RuntimeError(f"unexpected answer {outcome['answer']!r}")


if __name__ == "__main__":
    main("agent", persist, body)
