"""How a prompt, and a prompt with its completion, become tokens: as plain text or as turns of
the tokenizer's chat template. The one home of that rule, so that the policy is sampled, TRL
trains it, the reward model is trained and the reward model scores on the same tokens.

plain: the text as the tokenizer encodes it, with the special tokens it adds itself (a BOS for
  Llama's tokenizer, nothing for GPT-2's): what TRL does with a plain-text prompt.
chat: the prompt is a user turn (with the generation prompt after it), the completion the
  assistant's answer; the template writes its own BOS and end-of-turn tokens. An instruct
  model's end of turn is its tokenizer's EOS (Llama 3's <|eot_id|>, Qwen's <|im_end|>), so a
  completion stops where the model ends its turn.

TRL's RewardTrainer would append an EOS to plain pairs, and its GRPOTrainer scores plain
prompt + completion without the BOS the trainer added: neither is used. Reward pairs go to the
trainer already tokenized here, and GRPO's reward-model reward calls `scored_ids` too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmpipe.errors import ParamsError
from llmpipe.io import write_json

FORMAT_FILE = "prompt_format.json"  # in the preference and task directories
# Passed to every rendering of a chat template, ours and TRL's. Llama 3's template writes
# "Today Date: <today>" into its system header unless given a date: the same prompt would
# have other token ids on another day, between stages and between a run and its rerun.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def message_text(value: str | list[dict]) -> str:
    """A prompt or completion as TRL passes it to a reward function: text, or (chat) a list
    of messages, whose last one is the turn itself."""
    return value if isinstance(value, str) else value[-1]["content"]


@dataclass(frozen=True)
class PromptFormat:
    chat: bool = False  # prompts are a user turn of the tokenizer's chat template

    def check(self, tokenizer, param: str) -> None:
        """A chat format needs a template: say which param asked for it."""
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise ParamsError(
                f"{param}: true needs a tokenizer with a chat template "
                f"({tokenizer.name_or_path or 'this tokenizer'} has none; an "
                "instruct model's tokenizer has one)"
            )

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """What the policy continues."""
        if self.chat:
            return self.conversation_ids(tokenizer, [_user(prompt)])
        return tokenizer(prompt).input_ids

    def conversation_ids(self, tokenizer, messages: Sequence[dict]) -> list[int]:
        """What the model continues after a conversation ({role, content} messages: system,
        user and assistant turns, as the server's chat requests bring them), the generation
        prompt after it. `prompt_ids` of a chat format is the case of one user turn."""
        if not self.chat:
            raise ValueError("a conversation has no plain-text form: use PromptFormat(chat=True)")
        return _ids(
            tokenizer.apply_chat_template(
                list(messages),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **TEMPLATE_KWARGS,
            )
        )

    def scored_ids(self, tokenizer, prompt: str, completion: str) -> list[int]:
        """What the reward model reads, when it is trained and when it scores."""
        if self.chat:
            return _ids(
                tokenizer.apply_chat_template(
                    [_user(prompt), _assistant(completion)],
                    tokenize=True,
                    return_dict=True,
                    **TEMPLATE_KWARGS,
                )
            )
        return tokenizer(prompt + completion).input_ids

    def trl_prompt(self, prompt: str) -> str | list[dict]:
        """A prompt in TRL's dataset format: text, or (chat) the conversation so far."""
        return [_user(prompt)] if self.chat else prompt

    def trl_completion(self, completion: str) -> str | list[dict]:
        return [_assistant(completion)] if self.chat else completion

    def write(self, directory: Path) -> None:
        write_json(directory / FORMAT_FILE, {"chat": self.chat})

    @classmethod
    def read(cls, directory: Path) -> PromptFormat:
        path = directory / FORMAT_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


PLAIN = PromptFormat()


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"]
    return ids[0] if ids and isinstance(ids[0], list) else ids


def left_padded(rows: Sequence[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Prompts for `generate`, padded on the left (generation continues every row's last
    token): input_ids and attention_mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def right_padded(rows: Sequence[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Sequences for a classifier that reads its last non-pad token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}
