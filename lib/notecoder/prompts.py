"""Turning a note into the token ids the model sees.

The fine-tuned model answers a bare note: the note is the user message, rendered with
the model's own chat template, with a system message only when one is configured. A
note too long for ``max_model_len - max_tokens`` is cut, measured with the tokenizer
itself, and flagged: never silently, never by characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Re-render attempts when cutting a note; decode/encode round trips can shift counts by
# a few tokens, and each pass shrinks by the measured excess, so two or three suffice.
MAX_CUT_PASSES = 8


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    truncated: bool


class PromptBuilder:
    """Renders notes with the chat template and keeps them inside the token budget."""

    def __init__(
        self, tokenizer: Any, system_prompt: str | None, max_prompt_tokens: int
    ):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.overhead = len(self._render(""))
        if self.overhead >= max_prompt_tokens:
            raise ValueError(
                f"the chat template alone takes {self.overhead} tokens, leaving no "
                f"room for a note in {max_prompt_tokens}: raise model.max_model_len "
                "or lower sampling.max_tokens"
            )

    def _messages(self, note: str) -> list[dict[str, str]]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": note})
        return messages

    def _render(self, note: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            self._messages(note),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return list(ids)

    def build(self, note: str) -> Prompt:
        """The prompt for one note, cut to fit when it must be."""
        ids = self._render(note)
        if len(ids) <= self.max_prompt_tokens:
            return Prompt(ids, truncated=False)
        note_ids = self.tokenizer.encode(note, add_special_tokens=False, verbose=False)
        keep = self.max_prompt_tokens - self.overhead
        for _ in range(MAX_CUT_PASSES):
            cut = self.tokenizer.decode(note_ids[:keep], skip_special_tokens=True)
            ids = self._render(cut)
            excess = len(ids) - self.max_prompt_tokens
            if excess <= 0:
                return Prompt(ids, truncated=True)
            keep = max(0, keep - excess)
        # Only a tokenizer whose decode/encode round trip keeps growing gets here; the
        # row is reported as an error rather than coded from a guess.
        raise ValueError(f"note could not be cut to {self.max_prompt_tokens} tokens")
