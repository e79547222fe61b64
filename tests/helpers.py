"""Test helpers shared by several test files."""
from __future__ import annotations

from dataset_v1 import token_batch
from models.llm import ChatText


def prompt_tokens(text: ChatText, prompts: list[str], targets: list[str] | None = None) -> dict:
    """The token side of a batch for prompts already rendered by the LLM's template (as the parity fixtures and
    hand-written test prompts are): what dataset_v1.collate gives for them."""
    items = []
    for i, prompt in enumerate(prompts):
        ids, positions = text.prompt_ids(prompt)
        items.append({"prompt_ids": ids, "target_ids": text.target_ids(targets[i])[0] if targets else [],
                      "slot_positions": positions})
    return token_batch(items)
