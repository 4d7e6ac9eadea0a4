"""An LLM-agent-style loop whose tool calls are answered from outside, one suspension per call.

Run it: ``python -m examples.agent``; the agent is in :mod:`examples.agent.app`.
"""
