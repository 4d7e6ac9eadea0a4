"""The agent example's Celery app and its task, ``run_agent``.

``run_agent`` is the usual agent loop: ask the model for the next action;
if it is a tool call, get the tool's result and loop; if it is a final
answer, return it. The tool runs *outside* the worker (a sandbox, another
service, a human in the loop), so each tool call is an
``self.await_input(prompt=<the call as JSON>)``: the task parks, its worker
slot is freed while the tool runs, and the tool's result comes back as the
resume input.

A resume re-runs the task from the top with the same id; the n-th
``await_input`` returns the n-th tool result. The model is the one thing not
to call again on a replay (slow, costly, not deterministic), so each of its
decisions is checkpointed as soon as it is made, and a replay reads the
decisions back instead of asking again. Here the "model" is
:func:`scripted_policy`, a deterministic stand-in, and ``policy_calls``
counts how often it really ran.
"""

from __future__ import annotations

import json
from typing import Any

from celery_persist import Persist, PersistentTask
from examples._embedded import make_app

app = make_app("agent")
persist = Persist(app)

TOOLS_DOC = {
    "weather": "weather(city, day) -> {summary, temp_c, rain_probability}",
    "calculator": "calculator(expression) -> number",
    "find_parks": "find_parks(city) -> [{name, rating}]",
}


def _observations(transcript: list[dict[str, Any]]) -> dict[str, Any]:
    return {m["tool"]: m["result"] for m in transcript if m["role"] == "tool"}


def scripted_policy(transcript: list[dict[str, Any]]) -> dict[str, Any]:
    """A deterministic stand-in for the model: the next action, given what happened so far."""
    seen = _observations(transcript)
    if "weather" not in seen:
        return {"type": "tool", "tool": "weather", "args": {"city": "Paris", "day": "saturday"}}
    weather = seen["weather"]
    if "calculator" not in seen:
        return {"type": "tool", "tool": "calculator", "args": {"expression": f"{weather['temp_c']} * 9 / 5 + 32"}}
    if weather["rain_probability"] < 0.5 and "find_parks" not in seen:
        return {"type": "tool", "tool": "find_parks", "args": {"city": "Paris"}}
    parks = seen.get("find_parks") or []
    where = f" at {max(parks, key=lambda p: p['rating'])['name']}" if parks else " indoors"
    verdict = "go ahead with the picnic" if parks else "plan something"
    return {
        "type": "final",
        "answer": f"Saturday in Paris: {weather['summary']}, {seen['calculator']:.1f} F, "
        f"{weather['rain_probability']:.0%} chance of rain: {verdict}{where}.",
    }


@app.task(base=PersistentTask, bind=True, acks_late=True, name="examples.agent.run_agent")
def run_agent(self: PersistentTask, goal: str, max_steps: int = 8, tool_timeout: float = 300.0) -> dict[str, Any]:
    """Work towards ``goal``; every tool call waits for its result from outside."""
    memo = self.checkpoint_state or {"decisions": [], "policy_calls": 0, "executions": 0}
    memo["executions"] += 1
    self.checkpoint(memo)
    transcript: list[dict[str, Any]] = [{"role": "user", "content": goal}]
    for step in range(max_steps):
        if step < len(memo["decisions"]):
            action = memo["decisions"][step]  # decided in an earlier execution: replay, do not ask again
        else:
            action = scripted_policy(transcript)
            memo["decisions"].append(action)
            memo["policy_calls"] += 1
            self.checkpoint(memo)
        if action["type"] == "final":
            return {
                "answer": action["answer"],
                "tool_calls": step,
                "policy_calls": memo["policy_calls"],
                "executions": memo["executions"],
                "transcript": transcript,
            }
        call = {"tool": action["tool"], "args": action["args"]}
        result = self.await_input(prompt=json.dumps(call, sort_keys=True), timeout=tool_timeout)
        transcript.append({"role": "tool", **call, "result": result})
    raise RuntimeError(f"no answer after {max_steps} steps")
