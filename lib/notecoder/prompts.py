"""Turning a note into the token ids the model sees.

The fine-tuned model answers a bare note: the note is the user message, rendered with
the model's own chat template, with a system message only when one is configured. A
note too long for ``max_model_len - max_tokens`` is cut, measured with the tokenizer
itself, and flagged: never silently, never by characters.

The template is rendered once around a placeholder; each note is tokenized on its own
with special tokens read as plain text and spliced between the template's two halves.
So a note that happens to contain ``</s>`` or a role marker cannot end its own turn or
speak for the assistant, and a long note is cut in token space exactly. For ordinary
notes the ids are the same as rendering the template around the note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Stands in for the note while the template is rendered; no note or template has it.
PLACEHOLDER = "\x00notecoder-note\x00"

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
        self.halves = self._split_template()
        if self.halves is None:
            self.overhead = len(self._render(""))
        else:
            self.overhead = len(self.halves[0]) + len(self.halves[1])
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

    def _split_template(self) -> tuple[list[int], list[int]] | None:
        text = self.tokenizer.apply_chat_template(
            self._messages(PLACEHOLDER), add_generation_prompt=True, tokenize=False
        )
        if not isinstance(text, str) or text.count(PLACEHOLDER) != 1:
            # A template that rewrites or repeats the message: render whole instead,
            # which leaves special tokens in notes read as special tokens.
            log.warning(
                "chat template does not place the note once, as it is; rendering "
                "each note whole (special tokens inside notes are not neutralised)"
            )
            return None
        before, after = text.split(PLACEHOLDER)
        return self._encode(before, split=False), self._encode(after, split=False)

    def _encode(self, text: str, split: bool) -> list[int]:
        return list(
            self.tokenizer.encode(
                text,
                add_special_tokens=False,
                split_special_tokens=split,
                verbose=False,
            )
        )

    def build(self, note: str) -> Prompt:
        """The prompt for one note, cut to fit when it must be."""
        if self.halves is not None:
            before, after = self.halves
            note_ids = self._encode(note, split=True)
            room = self.max_prompt_tokens - self.overhead
            return Prompt(before + note_ids[:room] + after, len(note_ids) > room)
        return self._build_whole(note)

    def _build_whole(self, note: str) -> Prompt:
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
