"""`dpokit chat` (streamed replies, the conversation, /reset) and `dpokit generate` (completions for a prompt
file), on tiny models whose greedy replies are known."""

from __future__ import annotations

import io
import json

import pytest

from dpokit.cli import main
from dpokit.pipeline.chat import Chat, chat_loop


class Writes(io.StringIO):
    """An output stream that keeps each write apart, to see a reply arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


def test_chat_streams_keeps_the_conversation_and_resets(saying):
    chat = Chat.load(saying(" A"), system="Answer with one letter.", temperature=0.0, max_new_tokens=5)
    out = Writes()
    answer = chat.reply("Hello?", out)
    assert answer.strip() == "A A A A A"
    assert len(out.pieces) > 1 and "".join(out.pieces).strip() == answer.strip()  # streamed, word by word
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]

    lines = io.StringIO("And now?\n\n/reset\nNew topic.\n/exit\nnever read\n")
    out = Writes()
    assert chat_loop(chat, lines, out) == 0
    shown = out.getvalue().splitlines()
    assert [line.strip() for line in shown] == ["A A A A A", "(new conversation)", "A A A A A"]
    # after /reset only the system message and the last exchange are left
    assert [(m["role"], m["content"].strip()) for m in chat.messages] == [
        ("system", "Answer with one letter."), ("user", "New topic."), ("assistant", "A A A A A")]


def test_chat_samples_are_seeded(tiny_model_dir):
    """At temperature 1 a reply is a sample (the tiny random model spreads over its 49k tokens): the same
    seed replays the same conversation, another seed gives another."""
    def conversation(seed):
        chat = Chat.load(tiny_model_dir, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed)
        return [chat.reply("Hi"), chat.reply("Hi")]

    first = conversation(3)
    assert conversation(3) == first and conversation(4) != first
    assert len({*first}) == 2  # the second turn samples anew


def test_chat_command_reads_piped_turns(saying, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi again\n"))
    assert main(["chat", saying(" A"), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == ["A A A", "(new conversation)",
                                                                             "A A A"]
    assert main(["chat", "/no/such/model"]) == 2


def test_generate_writes_rows_or_prints(saying, tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nName a color.\nWhat sound does a cat make?\n")
    out = tmp_path / "rows.jsonl"
    assert main(["generate", str(prompts), "--model", saying(" A"), "--max-new-tokens", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": p}] for p in prompts.read_text().splitlines()]
    assert all(r["completions"] == [" A A A"] and r["num_tokens"] == [3] and r["finished"] == [False] for r in rows)
    assert "3 completions for 3 prompts" in capsys.readouterr().out

    # sampled, several per prompt, printed; the same seed gives the same completions
    args = ["generate", str(prompts), "--model", tiny_model_dir, "--temperature", "1", "--n", "2",
            "--max-new-tokens", "4", "--seed", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("### ") == 3 and "### Name a color." in printed
    assert main(args) == 0 and capsys.readouterr().out == printed
    with pytest.raises(SystemExit):
        main(["generate"])  # the prompt file is required
