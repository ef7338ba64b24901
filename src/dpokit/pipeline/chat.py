"""`dpokit chat`: talk to a model (an exported run, a checkpoint, any model `model.name` accepts), and
`dpokit generate`: completions for a prompt file, without a judge.

chat keeps the conversation, renders it with the model's chat template and streams the reply as it is
generated (transformers' `TextStreamer` on `generation.backends.generate`, the sampling code of `dpokit
sample`). Each line read is one user turn; `/reset` starts a new conversation, `/exit` or end of input
leaves. A reply ends at the model's end-of-turn token or after `max_new_tokens`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from dpokit import models
from dpokit.errors import ConfigError
from dpokit.generation.prompts import Prompt, as_model_input

RESET, EXIT = "/reset", "/exit"


class Chat:
    """A loaded model and tokenizer, and the conversation so far."""

    def __init__(self, model, tokenizer, *, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int = 256, seed: int = 0):
        from dpokit.generation.backends import pad_id_for, stop_token_ids

        if tokenizer.chat_template is None:
            raise ConfigError("this model's tokenizer has no chat template; use `dpokit generate` to continue text")
        self.model, self.tokenizer = model, tokenizer
        self.system, self.temperature, self.top_p, self.max_new_tokens = system, temperature, top_p, max_new_tokens
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = pad_id_for(tokenizer, self.stop_ids)
        self.seed, self.turn = seed, 0
        self.messages: list[dict] = []
        self.reset()

    @classmethod
    def load(cls, name: str, *, device: str = "auto", dtype: str = "float32", **options) -> Chat:
        from dpokit.distributed import pick_device
        from dpokit.rundir import load_tokenizer_for

        tokenizer = load_tokenizer_for(name)
        model = models.load_for_generation(name, dtype=dtype, device=pick_device(device))
        return cls(model, tokenizer, **options)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, out: TextIO | None = None) -> str:
        """The model's answer to the user turn `text`, streamed to `out` as it is generated; both turns join
        the conversation."""
        from dpokit.generation.backends import generate

        self.messages.append({"role": "user", "content": text})
        _, ids = as_model_input(self.messages, self.tokenizer, "chat")
        streamer = streamer_to(out, self.tokenizer) if out is not None else None
        (completion,) = generate(self.model, [ids], temperature=self.temperature, top_p=self.top_p,
                                 max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id,
                                 seed=self.seed + self.turn, streamer=streamer)
        self.turn += 1
        stops = set(self.stop_ids)
        answer = self.tokenizer.decode([t for t in completion.ids if t not in stops], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def streamer_to(out: TextIO, tokenizer):
    """transformers' TextStreamer, writing to `out` instead of print()."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_loop(chat: Chat, lines: TextIO = sys.stdin, out: TextIO = sys.stdout, *, interactive: bool = False) -> int:
    """Read user turns from `lines` until /exit or the end; stream each reply to `out`."""
    if interactive:
        out.write(f"chatting with the model; {RESET} starts over, {EXIT} or Ctrl-D leaves\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            break
        if text == RESET:
            chat.reset()
            out.write("(new conversation)\n")
            continue
        chat.reply(text, out)
    return 0


def generate_rows(sampler, prompts: list[Prompt]) -> list[dict]:
    """Completions of every prompt, as `dpokit sample` rows without log-probs (the sampler batches them,
    shortest prompts first)."""
    encoded = [sampler.encode(p) for p in prompts]
    drawn = sampler.sample_ids([ids for _, ids in encoded])
    return [{"index": k, "prompt": stored, "completions": [sampler.decode(c.ids) for c in completions],
             "num_tokens": [len(c.ids) for c in completions], "finished": [c.finished for c in completions]}
            for k, ((stored, _), completions) in enumerate(zip(encoded, drawn))]
