"""`--judge llm`: a language model as the judge, as the DPO paper evaluated TL;DR summaries and dialogue
with GPT-4 (Rafailov et al. 2023, §6.2 and Appendix C.2).

Two modes (`--judge-option mode=...`):

    pairwise  (default) which of two completions of a prompt is better. Each pair is asked in both orders
              (first as A, then as B) to cancel the judge's position bias; a verdict may be a tie. The
              first completion's win probability is the mean over the two orders of 1 (won), ½ (tie) or
              0 (lost), so it is one of 0, ¼, ½, ¾, 1. `dpokit evaluate` reports the win rate of the
              policy's samples against the reference's, or against the dataset's chosen completions.
    score     a score of one completion (1 to 10 with the default template): a judge like any other,
              for `dpokit label`, `evaluate`, `ppo` and `train.sample_judge`.

The judge is greedy (temperature 0), so its verdicts are repeatable. A reply whose verdict cannot be
read counts as a tie (pairwise) or the middle of the scale (score) and is counted in `unparsed`; the
commands print that count. The prompt templates are plain text with the fields {prompt}, {response_a} and
{response_b} (pairwise) or {prompt} and {completion} (score); `template=FILE` replaces the default.

Backends, both OpenAI-style chat: a local transformers model (`--judge-model NAME_OR_DIR`, anything
`model.name` accepts; generation is `dpokit sample`'s `Sampler`), or any OpenAI-compatible endpoint
(`--judge-option url=http://host:8000/v1 --judge-option model=NAME`: vLLM, llama.cpp's server,
`transformers serve`, a hosted API with `api_key=...` or OPENAI_API_KEY).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dpokit.errors import ConfigError, DpokitError
from dpokit.generation.prompts import Prompt, prompt_text
from dpokit.generation.settings import SamplingSettings

# the DPO paper's GPT-4 prompt for dialogue (Appendix C.2), with ties allowed
PAIRWISE_TEMPLATE = """For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{response_a}

Response B:
{response_b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A", "B" or "tie" to indicate which response is more helpful. Your response \
should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A", "B" or "tie">"""

SCORE_TEMPLATE = """For the following query to a chatbot, rate how helpful the response is, from 1 (not at all) \
to 10 (as helpful as possible).

Query: {prompt}

Response:
{completion}

FIRST explain your rating in one sentence. SECOND, on a new line, give the rating. Your response should use the \
format:
Explanation: <one sentence>
Rating: <a number from 1 to 10>"""

FIELDS = {"pairwise": ("{prompt}", "{response_a}", "{response_b}"), "score": ("{prompt}", "{completion}")}


def fill(template: str, **values: str) -> str:
    """The template with each {field} replaced, in one pass (a completion that contains "{response_b}" stays
    as it is); other braces are left as they are."""
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


# a verdict: A or B (capitals only: "a" is an article), optionally "Response A", or a tie
_VERDICT = r"(?:(?:response|answer|assistant|output)\s+)?(?:(?-i:(A|B))|(?:an?\s+)?(tie|neither|both|equal))\b"
_LABELLED = re.compile(r"(?:more helpful|verdict|answer|better|winner)\s*\**\s*[:：]\s*[\W_]*" + _VERDICT,
                       flags=re.IGNORECASE)
_ALONE = re.compile(r"[\W_]*" + _VERDICT + r"[\W_]*", flags=re.IGNORECASE)


def read_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from a pairwise reply: after its last `More helpful:` (or `Verdict:`, `Answer:`,
    `Better:`, `Winner:`) label, else its last line when that line is the verdict alone; None otherwise."""
    labelled = list(_LABELLED.finditer(reply))
    if labelled:
        found = labelled[-1]
    else:
        lines = [line for line in reply.splitlines() if line.strip()]
        found = _ALONE.fullmatch(lines[-1].strip()) if lines else None
    if found is None:
        return None
    return found.group(1) or "tie"


def read_score(reply: str, low: float, high: float) -> float | None:
    """The number after the reply's last `Rating:` / `Score:` label, else its last line's only number;
    None when there is none or it is outside [low, high]."""
    labelled = re.findall(r"(?:rating|score)\s*[:：]\s*\**\s*(-?\d+(?:\.\d+)?)", reply, flags=re.IGNORECASE)
    if labelled:
        value = float(labelled[-1])
    else:
        lines = [line for line in reply.splitlines() if line.strip()]
        numbers = re.findall(r"-?\d+(?:\.\d+)?", lines[-1]) if lines else []
        if len(numbers) != 1:
            return None
        value = float(numbers[0])
    return value if low <= value <= high else None


def query_text(prompt: Prompt) -> str:
    """What the judge is shown as the query: a one-message conversation's text, else the conversation."""
    if isinstance(prompt, list) and len(prompt) == 1:
        return prompt[0]["content"]
    return prompt_text(prompt)


# ------------------------------------------------------------------------------------------ backends


class LocalChat:
    """A transformers causal LM answering chat messages greedily, batched (`Sampler` with its chat template)."""

    def __init__(self, model: str, *, max_new_tokens: int, batch_size: int = 8, device: str = "auto",
                 dtype: str = "float32"):
        from dpokit.generation.sampling import Sampler
        settings = SamplingSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    template="chat")
        self.sampler = Sampler.load(model, settings, device=device, dtype=dtype)
        self.name = model

    def reply(self, conversations: Sequence[list[dict]]) -> list[str]:
        ids = [self.sampler.encode(list(c))[1] for c in conversations]
        return [self.sampler.decode(cs[0].ids) for cs in self.sampler.sample_ids(ids)]


TIMEOUT = 60.0  # seconds a request may take (--judge-option timeout=S)
PROBE_SECONDS = 5.0


def probe(url: str) -> None:
    """Connect to the endpoint's host once, before anything is sampled: an address nothing listens on (or
    that cannot be resolved) fails here in seconds, not after the policy and the reference were sampled."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"llm judge: url must be http(s)://host[:port]/..., got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise ConfigError(f"llm judge: cannot reach {parts.scheme}://{parts.hostname}:{port} "
                          f"({e.strerror or type(e).__name__}); is the server running?") from None


class OpenAIChat:
    """POST /chat/completions of an OpenAI-compatible server, temperature 0, `workers` requests at a time."""

    def __init__(self, url: str, model: str, *, max_new_tokens: int, api_key: str | None = None,
                 timeout: float = TIMEOUT, workers: int = 4):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.max_new_tokens, self.timeout, self.workers = model, max_new_tokens, timeout, workers
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.name = f"{model}@{url}"


    def reply(self, conversations: Sequence[list[dict]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._one, conversations))

    def _one(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_new_tokens,
                "stream": False}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200]
            raise DpokitError(f"judge endpoint {self.url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise DpokitError(f"cannot reach the judge endpoint {self.url}: {reason}") from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise DpokitError(f"judge endpoint {self.url}: not a chat completion: {str(answer)[:200]}") from None


# ------------------------------------------------------------------------------------------ the judge


class LLMJudge:
    name = "llm"

    def __init__(self, backend, *, mode: str = "pairwise", template: str | None = None, low: float = 1.0,
                 high: float = 10.0):
        if mode not in FIELDS:
            raise ConfigError(f"llm judge: mode must be pairwise or score; got {mode!r}")
        self.backend, self.mode, self.low, self.high = backend, mode, float(low), float(high)
        self.template = PAIRWISE_TEMPLATE if mode == "pairwise" else SCORE_TEMPLATE
        if template is not None:
            path = Path(str(template)).expanduser()
            if not path.is_file():
                raise ConfigError(f"llm judge: template file not found: {template}")
            self.template = path.read_text(encoding="utf-8")
            missing = [f for f in FIELDS[mode] if f not in self.template]
            if missing:
                raise ConfigError(f"llm judge: the {mode} template {template} lacks {', '.join(missing)}")
        self.unparsed = 0  # replies whose verdict or score could not be read
        self.replies = 0

    @property
    def pairwise(self) -> bool:
        return self.mode == "pairwise"

    def _ask(self, texts: list[str]) -> list[str]:
        replies = self.backend.reply([[{"role": "user", "content": t}] for t in texts])
        self.replies += len(replies)
        return replies

    def compare(self, prompts: Sequence[Prompt], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        """P(first better than second) for each triple: the mean over both orders of 1 / ½ (tie) / 0."""
        if not self.pairwise:
            raise ConfigError("the llm judge compares completions with mode=pairwise (it is in mode=score)")
        queries = [query_text(p) for p in prompts]
        asked = [fill(self.template, prompt=q, response_a=a, response_b=b) for q, a, b in zip(queries, firsts, seconds)]
        asked += [fill(self.template, prompt=q, response_a=b, response_b=a) for q, a, b in zip(queries, firsts, seconds)]
        verdicts = [read_verdict(r) for r in self._ask(asked)]
        self.unparsed += sum(v is None for v in verdicts)
        n = len(queries)
        first_as_a = [{"A": 1.0, "B": 0.0}.get(v, 0.5) for v in verdicts[:n]]
        first_as_b = [{"A": 0.0, "B": 1.0}.get(v, 0.5) for v in verdicts[n:]]
        return [(x + y) / 2 for x, y in zip(first_as_a, first_as_b)]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        if self.pairwise:
            raise ConfigError("the llm judge in mode=pairwise compares two completions; to score single completions "
                              "(dpokit label, ppo, best-of-N) use --judge-option mode=score")
        asked = [fill(self.template, prompt=query_text(p), completion=c) for p, c in zip(prompts, completions)]
        scores = [read_score(r, self.low, self.high) for r in self._ask(asked)]
        self.unparsed += sum(s is None for s in scores)
        middle = (self.low + self.high) / 2
        return [middle if s is None else s for s in scores]

    def note(self) -> str | None:
        """A line about unreadable replies, or None."""
        if not self.unparsed:
            return None
        counted = "ties" if self.pairwise else f"{(self.low + self.high) / 2:g}"
        return (f"llm judge: {self.unparsed} of {self.replies} replies gave no readable "
                f"{'verdict' if self.pairwise else 'rating'}, counted as {counted}")


def build_llm_judge(local_model: str | None = None, *, url: str | None = None, model: str | None = None,
                    mode: str = "pairwise", template: str | None = None, max_new_tokens: int = 128,
                    batch_size: int = 8, device: str = "auto", dtype: str = "float32", api_key: str | None = None,
                    timeout: float = TIMEOUT, workers: int = 4, low: float = 1.0, high: float = 10.0) -> LLMJudge:
    """`--judge llm`: `local_model` is --judge-model; `url` and `model` (the served model's name) the endpoint."""
    if (local_model is None) == (url is None):
        raise ConfigError("the llm judge needs a model: --judge-model NAME_OR_DIR (local transformers) or "
                          "--judge-option url=http://host:port/v1 --judge-option model=NAME (OpenAI-compatible "
                          "server), not both")
    if url is not None:
        if model is None:
            raise ConfigError("the llm judge's endpoint needs the served model's name: --judge-option model=NAME")
        backend = OpenAIChat(str(url), str(model), max_new_tokens=int(max_new_tokens), api_key=api_key,
                             timeout=float(timeout), workers=int(workers))
    else:
        if model is not None:
            raise ConfigError("--judge-option model= names an endpoint's model; with --judge-model leave it out")
        backend = LocalChat(local_model, max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
                            device=str(device), dtype=str(dtype))
    judge = LLMJudge(backend, mode=mode, template=template, low=low, high=high)
    if url is not None:
        probe(backend.url)
    return judge


def pairwise_win_rate(judge: LLMJudge, prompts: Sequence[Prompt], samples: Sequence[Sequence[str]],
                      opponents: Sequence[Sequence[str]]) -> list[list[float]]:
    """Per prompt, the win probability of each sample against an opponent of the same prompt (sample j
    against opponent j mod m): one judged pair, both orders, per sample."""
    flat = [(i, p, s, opponents[i][j % len(opponents[i])])
            for i, (p, ss) in enumerate(zip(prompts, samples)) for j, s in enumerate(ss) if opponents[i]]
    wins = judge.compare([p for _, p, _, _ in flat], [s for _, _, s, _ in flat], [o for _, _, _, o in flat])
    out: list[list[float]] = [[] for _ in prompts]
    for (i, _, _, _), w in zip(flat, wins):
        out[i].append(w)
    return out


def round_robin_scores(judge: LLMJudge, prompts: Sequence[Prompt],
                       groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Per prompt, each of its completions' mean win probability against the prompt's other completions:
    every pair judged once (both orders, `compare`), K(K−1)/2 pairs for K completions. The ranking a
    pairwise judge gives where pairs are picked by score (online DPO): with K = 2 the winner scores the
    judge's P(better) and the loser its complement; a tie ½ each."""
    flat = [(g, i, j) for g, texts in enumerate(groups) for i, j in itertools.combinations(range(len(texts)), 2)]
    wins = judge.compare([prompts[g] for g, _, _ in flat], [groups[g][i] for g, i, _ in flat],
                         [groups[g][j] for g, _, j in flat]) if flat else []
    totals = [[0.0] * len(texts) for texts in groups]
    for (g, i, j), w in zip(flat, wins):
        totals[g][i] += w
        totals[g][j] += 1.0 - w
    return [[t / max(1, len(texts) - 1) for t in row] for row, texts in zip(totals, groups)]

