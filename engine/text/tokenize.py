"""Samples -> token ids, and for every token whether the loss trains the model to predict it.

Plain text trains every token and ends with the tokenizer's EOS, so a model trained on one sample a
line learns where a sample ends. A prompt + completion trains the completion only. A chat is rendered
with the chat template exactly as inference renders it, and only the assistant turns are trained (their
content and the end-of-turn marker the template puts after it; the role headers and every other turn
are context). The assistant turns are found by rendering the conversation up to each of them: the text
between "everything before, with the generation prompt" and "everything up to this turn" is that turn.
The whole conversation is then tokenized once and each token is marked by where its characters lie, so
the ids are the ones inference sees. A template that renders earlier turns differently once later ones
exist (some drop earlier reasoning) is used through its `{% generation %}` markers when it has them,
and is refused otherwise with what to set instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DatasetError
from .sources import Sample

IGNORE = -100  # the target of a position nothing is trained on (PyTorch's and transformers' ignore_index)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass
class Encoded:
    ids: list[int]
    trained: list[bool]  # trained[i]: the loss trains predicting ids[i] from ids[:i]
    where: str
    _tensors: tuple | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self) -> tuple:
        """(ids, targets) as tensors, made once: targets[i] is the token to predict after position i,
        -100 where nothing is trained (and after the last token)."""
        if self._tensors is None:
            ids = torch.tensor(self.ids, dtype=torch.long)
            trained = torch.tensor(self.trained[1:] + [False], dtype=torch.bool)
            targets = torch.where(trained, torch.roll(ids, -1), torch.full_like(ids, IGNORE))
            self._tensors = (ids, targets)
        return self._tensors


def resolve_chat_template(tokenizer, setting: str) -> tuple[str | None, bool]:
    """(template, changed): the template chat samples use, and whether it differs from the tokenizer's."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    value = (setting or "auto").strip()
    if value == "auto":
        return own, False
    if value.lower() == "chatml":
        return CHATML, CHATML != own
    if "{{" in value or "{%" in value:
        return value, value != own
    path = Path(value).expanduser()
    if path.is_file():
        template = path.read_text(encoding="utf-8-sig")
        return template, template != own
    raise ConfigError(f"chat_template must be auto, chatml, a template file or a Jinja template; '{setting}' is "
                      f"none of these (no such file).")


class Encoder:
    """Tokenizes samples for one tokenizer and chat template."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tok = tokenizer
        self.template = chat_template
        self.eos = tokenizer.eos_token_id

    # --- plain text and prompt + completion ----------------------------------------------------------
    def encode(self, sample: Sample) -> Encoded:
        if sample.is_chat:
            return self._chat(sample)
        ids: list[int] = []
        trained: list[bool] = []
        for i, (text, train) in enumerate(sample.segments):
            piece = self.tok(text, add_special_tokens=i == 0).input_ids
            ids += piece
            trained += [train] * len(piece)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
            trained.append(sample.segments[-1][1])
        if trained:
            trained[0] = False  # nothing precedes the first token
        return Encoded(ids, trained, sample.where)

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """How a sample prompt is fed for generation: as the user turn of a chat, or as plain text."""
        if chat and self.template:
            text = self._render([{"role": "user", "content": prompt}], generation_prompt=True)
            return self.tok(text, add_special_tokens=False).input_ids
        return self.tok(prompt, add_special_tokens=True).input_ids

    # --- chat --------------------------------------------------------------------------------------
    def _render(self, messages, generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # the template's own error (e.g. "roles must alternate") says what is wrong
            raise DatasetError(f"the chat template cannot render this conversation: {exc}") from None

    def _chat(self, sample: Sample) -> Encoded:
        if not self.template:
            raise DatasetError(f"{sample.where} is a chat (messages), but the tokenizer of base_model has no chat "
                               f"template. Set chat_template: chatml (or a template file), or give plain text.")
        messages = sample.messages
        full = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1])
            if not upto.startswith(before) or not full.startswith(upto):
                return self._chat_generation_markers(sample)
            spans.append((len(before), len(upto)))
        try:
            encoding = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoding.input_ids, encoding.offset_mapping
        except NotImplementedError:  # a slow tokenizer has no offsets: tokenize the pieces one by one
            return self._chat_by_pieces(full, spans, sample.where)
        trained = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        if trained:
            trained[0] = False
        return Encoded(list(ids), trained, sample.where)

    def _chat_by_pieces(self, full: str, spans, where: str) -> Encoded:
        ids: list[int] = []
        trained: list[bool] = []
        cut = 0
        for a, b in spans + [(len(full), len(full))]:
            for text, train in ((full[cut:a], False), (full[a:b], True)):
                if text:
                    piece = self.tok(text, add_special_tokens=False).input_ids
                    ids += piece
                    trained += [train] * len(piece)
            cut = b
        if trained:
            trained[0] = False
        return Encoded(ids, trained, where)

    def _chat_generation_markers(self, sample: Sample) -> Encoded:
        if "{% generation %}" not in self.template and "{%- generation %}" not in self.template:
            raise DatasetError(f"{sample.where}: the chat template renders earlier turns differently once a later "
                               f"turn is added (some templates drop earlier reasoning), so the assistant turns "
                               f"cannot be located. Set chat_template: chatml or a template file that renders "
                               f"each turn the same way.")
        out = self.tok.apply_chat_template(sample.messages, chat_template=self.template, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if mask:
            mask[0] = False
        return Encoded(ids, mask, sample.where)
