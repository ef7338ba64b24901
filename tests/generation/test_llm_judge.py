"""`--judge llm`: reading verdicts and ratings, both orders of every pair, the local transformers backend and
an OpenAI-compatible endpoint (`transformers serve`, started here) on tiny models whose replies are known, and
`dpokit evaluate --against chosen`."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.errors import ConfigError, DpokitError
from dpokit.generation.judges import build_judge
from dpokit.generation.llm_judge import LLMJudge, LocalChat, OpenAIChat, fill, read_score, read_verdict
from dpokit.generation.settings import SamplingSettings
from dpokit.pipeline.evaluate import Evaluator
from tests.helpers import write_jsonl

PROMPTS = ["What is the capital of France?", "Name a color.", "What sound does a cat make?"]


def test_verdicts_and_ratings_are_read_from_replies():
    assert read_verdict("Comparison: B is shorter.\nMore helpful: A") == "A"
    assert read_verdict("**More helpful:** **B**") == "B"
    assert read_verdict("More helpful: Response B, it answers") == "B"
    assert read_verdict("Comparison: both are fine\nMore helpful: Tie.") == "tie"
    assert read_verdict("Verdict: neither") == read_verdict("More helpful: a tie") == "tie"
    assert read_verdict("More helpful: A\nMore helpful: B") == "B"  # the last label counts
    assert read_verdict(" A") == read_verdict("A.") == "A"  # a verdict alone on the last line
    assert read_verdict("A cat meows.") is None  # "A" opening a sentence is no verdict
    assert read_verdict("More helpful: a lot") is None and read_verdict("") is None
    assert read_score("Explanation: 3 facts.\nRating: **8**", 1, 10) == 8.0
    assert read_score(" 7", 1, 10) == 7.0 and read_score("I give it 4.5", 1, 10) == 4.5
    assert read_score("Rating: 11", 1, 10) is None and read_score("one or 2 or 3", 1, 10) is None
    # one pass: a completion quoting a field is not filled in again
    assert fill("{prompt}|{response_a}|{response_b}|{x}", prompt="p", response_a="{response_b}",
                response_b="b") == "p|{response_b}|b|{x}"


class Prefers:
    """A judge backend answering by a rule on the two responses it is shown (the position they are in
    does not matter to it), in the reply format the default template asks for."""

    def __init__(self, better):
        self.better, self.asked = better, []

    def reply(self, conversations):
        out = []
        for (message,) in conversations:
            text = message["content"]
            self.asked.append(text)
            a, b = re.search(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nFIRST", text, re.DOTALL).groups()
            verdict = self.better(a, b)
            out.append(f"Comparison: one sentence.\nMore helpful: {verdict}" if verdict else "I cannot say.")
        return out


def longer(a, b):
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


def test_pairwise_judge_asks_both_orders_and_counts_ties_and_unread_replies(tmp_path):
    backend = Prefers(longer)
    judge = LLMJudge(backend)
    wins = judge.compare(PROMPTS, ["Paris is the capital.", "Red", "Meow"], ["Paris.", "Tan", "A cat meows."])
    assert wins == [1.0, 0.5, 0.0]
    assert len(backend.asked) == 6  # each pair in both orders
    assert "Response A:\nParis is the capital." in backend.asked[0]
    assert "Response A:\nParis.\n" in backend.asked[3] and "Query: What is the capital of France?" in backend.asked[3]
    assert judge.unparsed == 0 and judge.note() is None

    # a judge that always answers A, whatever it is shown, is cancelled by the swapped order
    first = LLMJudge(Prefers(lambda a, b: "A"))
    assert first.compare(PROMPTS, ["x", "yy", "zzz"], ["zzz", "y", "z"]) == [0.5, 0.5, 0.5]
    # one order read, the other not: the unread one counts as a tie
    half = LLMJudge(Prefers(lambda a, b: "A" if a == "win" else None))
    assert half.compare(PROMPTS[:1], ["win"], ["lose"]) == [0.75]
    assert half.unparsed == 1 and half.replies == 2
    assert half.note() == "llm judge: 1 of 2 replies gave no readable verdict, counted as ties"
    with pytest.raises(ConfigError, match="mode=score"):
        half.score(PROMPTS[:1], ["x"])

    # a replaced template: its fields are filled, and one without them is refused
    template = tmp_path / "judge.txt"
    template.write_text("Q: {prompt}\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\nFIRST think.")
    mine = Prefers(longer)
    assert LLMJudge(mine, template=str(template)).compare(PROMPTS[:1], ["ab"], ["a"]) == [1.0]
    assert mine.asked[0].startswith("Q: What is the capital of France?\nResponse A:\nab")
    template.write_text("Which is better, {response_a} or {response_b}?")
    with pytest.raises(ConfigError, match=r"lacks \{prompt\}"):
        LLMJudge(mine, template=str(template))


def test_local_model_judge_pairwise_score_and_unread(saying):
    """A real transformers judge (`--judge-model`): its greedy replies are fixed by construction."""
    says_a = build_judge("llm", model=saying(" A"), options={"max_new_tokens": 1})
    assert says_a.name == "llm" and says_a.pairwise
    assert says_a.backend.reply([[{"role": "user", "content": "Which?"}]]) == [" A"]
    # always "A": position bias only, which asking both orders cancels
    assert says_a.compare(PROMPTS, ["Paris.", "Blue.", "Meow."], ["London.", "", "Woof."]) == [0.5, 0.5, 0.5]
    assert says_a.unparsed == 0 and says_a.replies == 6

    rates = build_judge("llm", model=saying("7"), options={"mode": "score", "max_new_tokens": 1})
    assert rates.score(PROMPTS, ["a", "b", "c"]) == [7.0, 7.0, 7.0] and rates.unparsed == 0

    babbles = build_judge("llm", model=saying("Hello"), options={"max_new_tokens": 3})
    assert babbles.compare(PROMPTS[:2], ["a", "b"], ["c", "d"]) == [0.5, 0.5]
    assert babbles.unparsed == 4 and "4 of 4 replies" in babbles.note()
    scorer = build_judge("llm", model=saying("Hello"), options={"mode": "score", "max_new_tokens": 3})
    assert scorer.score(PROMPTS[:1], ["a"]) == [5.5] and scorer.note().endswith("counted as 5.5")

    with pytest.raises(ConfigError, match="needs a model"):
        build_judge("llm")
    with pytest.raises(ConfigError, match="served model's name"):
        build_judge("llm", options={"url": "http://127.0.0.1:9/v1"})
    with pytest.raises(ConfigError, match="mode must be"):
        build_judge("llm", options={"url": "http://127.0.0.1:9/v1", "model": "m", "mode": "rank"})


# ------------------------------------------------------------------------------------------ a real endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve` (transformers[serving], an OpenAI-compatible server) on a free port; it loads
    each model the requests name (a local directory here) on demand."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cli = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--dtype", "float32"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_http_judge_against_transformers_serve(served, saying):
    asked = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
    served_replies = OpenAIChat(served, saying(" A"), max_new_tokens=3, workers=2).reply(asked)
    assert served_replies == LocalChat(saying(" A"), max_new_tokens=3).reply(asked) == [" A A A"] * 3

    says_a = build_judge("llm", options={"url": served, "model": saying(" A"), "max_new_tokens": 1, "workers": 2})
    assert says_a.compare(PROMPTS, ["Paris.", "Blue.", "Meow."], ["London.", "", "Woof."]) == [0.5, 0.5, 0.5]
    assert says_a.unparsed == 0 and says_a.replies == 6

    rates = build_judge("llm", options={"url": served, "model": saying("7"), "mode": "score", "max_new_tokens": 1})
    assert rates.score(PROMPTS, ["a", "b", "c"]) == [7.0, 7.0, 7.0]
    babbles = build_judge("llm", options={"url": served, "model": saying("Hello"), "max_new_tokens": 2})
    assert babbles.compare(PROMPTS[:1], ["a"], ["b"]) == [0.5] and babbles.unparsed == 2

    # an endpoint that stops answering after the judge was built: the request's own error
    judge = build_judge("llm", options={"url": served, "model": saying(" A"), "max_new_tokens": 1})
    judge.backend.url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    with pytest.raises(DpokitError, match="cannot reach the judge endpoint"):
        judge.compare(PROMPTS[:1], ["a"], ["b"])


# ------------------------------------------------------------------------------------------ evaluate --against chosen


@pytest.fixture
def heldout(tmp_path) -> Path:
    chosen = ["Paris.", "Blue is a color.", "A cat meows."]
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": "No."}]} for p, c in zip(PROMPTS, chosen)]
    return write_jsonl(tmp_path / "heldout.jsonl", rows)


def test_evaluate_against_chosen_completions(tiny_model_dir, heldout, tmp_path, saying, capsys):
    from dpokit.generation.prompts import read_prompts
    from dpokit.pipeline.evaluate import read_chosen

    settings = SamplingSettings(n=2, max_new_tokens=4, seed=3)
    chosen = read_chosen(heldout)
    assert chosen == ["Paris.", "Blue is a color.", "A cat meows."]

    # a pointwise judge: samples scored against the chosen completions' scores
    length = build_judge("length")
    evaluator = Evaluator(tiny_model_dir, length, settings, prompts=read_prompts(heldout), against="chosen",
                          chosen=chosen, progress=False)
    result = evaluator.evaluate(tiny_model_dir, samples_out=tmp_path / "samples.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    chosen_words = [len(c.split()) for c in chosen]
    expected = sum(sum((s > c) + 0.5 * (s == c) for s in r["scores"]) / 2 for r, c in zip(rows, chosen_words)) / 3
    assert result.against == "chosen" and result.win_rate.mean == pytest.approx(expected)
    assert result.reward_chosen.mean == pytest.approx(sum(chosen_words) / 3)

    # a pairwise judge sees each sample against its prompt's chosen completion, in both orders
    backend = Prefers(lambda a, b: "A" if a in chosen else "B" if b in chosen else "tie")
    evaluator = Evaluator(tiny_model_dir, LLMJudge(backend), settings, prompts=read_prompts(heldout),
                          against="chosen", chosen=chosen, progress=False)
    result = evaluator.evaluate(tiny_model_dir)
    assert result.win_rate.mean == 0.0 and math.isnan(result.reward_policy.mean)
    assert len(backend.asked) == 12  # 3 prompts × 2 samples × 2 orders
    assert all(c in q for c, q in zip([c for c in chosen for _ in range(2)], backend.asked[:6]))

    # the command: a real local judge model, always "A", so both orders give a win rate of exactly ½
    out = tmp_path / "result.json"
    assert main(["evaluate", tiny_model_dir, "--reference", tiny_model_dir, "--prompts", str(heldout),
                 "--against", "chosen", "--judge", "llm", "--judge-model", saying(" A"),
                 "--judge-option", "max_new_tokens=1", "--n", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    saved = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {out}"))
    assert saved["against"] == "chosen" and saved["win_rate"]["mean"] == 0.5 and saved["judge"] == "llm"
    assert saved["reward_policy"]["mean"] is None  # a pairwise judge has no rewards: null, not NaN
    assert "win rate vs the chosen completions" in capsys.readouterr().out

    # best-of-N needs scores: refused before anything is sampled
    assert main(["evaluate", "--best-of", "2", "--reference", tiny_model_dir, "--prompts", str(heldout),
                 "--judge", "llm", "--judge-option", "url=http://127.0.0.1:9/v1", "--judge-option", "model=m"]) == 2
    assert "--best-of needs a judge that scores" in capsys.readouterr().err


def test_llm_judge_scores_samples_while_training(tiny_config, saying, pairs_file):
    from dpokit.trainer import train

    judge = [f"data.eval={pairs_file}", "train.sample_every=2", "train.sample_count=2",
             "train.sample_max_new_tokens=3", "train.sample_judge=llm", f"train.sample_judge_model={saying('7')}"]
    with pytest.raises(ConfigError, match="compares pairs unless"):
        train(tiny_config(*judge))
    result = train(tiny_config(*judge, "train.sample_judge_options=[mode=score, max_new_tokens=1]",
                               "train.max_steps=2"))
    rows = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["score"]) for r in rows] == [(0, 7.0), (0, 7.0), (2, 7.0), (2, 7.0)]


def test_an_unknown_option_lists_the_judges_options_and_an_unreachable_endpoint_fails_at_once():
    import socket
    import time

    with pytest.raises(ConfigError, match=r"judge llm: unknown option 'foo'; its options: url, model, mode, "):
        build_judge("llm", options={"foo": 1, "url": "http://127.0.0.1:9/v1", "model": "m"})
    with pytest.raises(ConfigError, match=r"judge length: unknown option 'unt' \(did you mean 'unit'\?\); its "
                                          r"options: unit, target"):
        build_judge("length", options={"unt": "chars"})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"llm judge: cannot reach http://127.0.0.1:{port} .*is the server running"):
        build_judge("llm", options={"url": f"http://127.0.0.1:{port}/v1", "model": "m"})
    assert time.monotonic() - start < 6
