"""Chat templates: turn a list of ``{"role", "content"}`` messages into one prompt string.

A checkpoint may carry its own template in its folder: ``chat_template.jinja``, or the
``chat_template`` field of ``tokenizer_config.json`` (the Hugging Face convention). Templates are
Jinja2, rendered in a sandbox with ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``. Without one, :data:`DEFAULT_CHAT_TEMPLATE` is used::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

and generation stops at ``"\\n<|"`` (the start of the next turn's header), so the model's reply
is one turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import UserError

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("\n<|",)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja2 chat template and the stop strings that end one assistant turn."""

    source: str = DEFAULT_CHAT_TEMPLATE
    stop: tuple[str, ...] = DEFAULT_CHAT_STOP

    def render(
        self, messages: Sequence[dict[str, str]], bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True
    ) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        try:
            return env.from_string(self.source).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except TemplateError as exc:
            raise UserError(f"the chat template failed to render: {exc}") from None


def load_chat_template(folder: str | Path | None) -> ChatTemplate:
    """The template found in ``folder`` (see the module docstring), or the default."""
    if folder is None:
        return ChatTemplate()
    p = Path(folder)
    if (p / "chat_template.jinja").is_file():
        return ChatTemplate((p / "chat_template.jinja").read_text(encoding="utf-8"), stop=())
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{cfg} is not a JSON object") from None
        if isinstance(template, str) and template:
            return ChatTemplate(template, stop=())
    return ChatTemplate()
