"""Judges: one small interface, `score(prompts, completions) -> list[float]`, batched.

    sentiment     VADER's compound score of the review (prompt + completion), in [-1, 1] (Hutto & Gilbert
                  2014; PyPI `vaderSentiment`, lexicon included): the stand-in for the DPO paper's
                  sentiment classifier. Given `model`, a hub or local sentiment classifier instead: the
                  probability of its positive label.
    reward-model  any Hugging Face sequence-classification model, local or hub: its scalar output (one
                  label), else the probability of `label`.
    length        completion length in words (or characters), or -|length - target| with a target.
    keywords      occurrences of the given words in the completion (whole words, case-insensitive).
    llm           a language model asked which of two completions is better, or to score one
                  (`llm_judge.py`: a local transformers model or an OpenAI-compatible endpoint).
    module:fn     a user's Python callable `fn(prompt, completion) -> float` (or an object with `score`,
                  or a callable marked `fn.batched = True` taking the two lists); the module may be a
                  .py file path.

A prompt is a string or a list of messages (see `prompts.py`). For a string prompt the text judged is
the continuation as a whole, `prompt + completion`, unless a judge is told `on=completion`; for a
conversation it is the reply alone (or the rendered conversation, for a reward model with a chat
template).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from dpokit.config_loader import split_assignment, yaml_value
from dpokit.distributed import pick_device
from dpokit.errors import ConfigError, DpokitError, UserCodeError
from dpokit.fields import did_you_mean
from dpokit.generation.llm_judge import build_llm_judge
from dpokit.generation.prompts import Prompt, prompt_text
from dpokit.models import local_files_only, resolve
from dpokit.rundir import FINAL_METRICS


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """One float per (prompt, completion); higher is better."""
        ...


def judged_text(prompt: Prompt, completion: str, on: str) -> str:
    """The text a text judge reads: the whole continuation for a string prompt (`on=text`), else the
    completion alone."""
    if on not in ("text", "completion"):
        raise ConfigError(f"judge option on must be text or completion; got {on!r}")
    return prompt + completion if on == "text" and isinstance(prompt, str) else completion


class LexiconJudge:
    """A sentiment lexicon as a judge: `valence(text)` of the text judged (`judged_text`, option `on`)."""

    name: str

    def __init__(self, on: str = "text"):
        judged_text("", "", on)
        self.on = on

    def valence(self, text: str) -> float:
        raise NotImplementedError

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [float(self.valence(judged_text(p, c, self.on))) for p, c in zip(prompts, completions)]


class VaderSentiment(LexiconJudge):
    """VADER compound score: normalised sum of lexicon valences with rules for negation, intensifiers,
    "but" and punctuation, compound = s / sqrt(s² + 15) ∈ [-1, 1]."""

    name = "sentiment"

    def __init__(self, on: str = "text"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        super().__init__(on)
        self.analyzer = SentimentIntensityAnalyzer()

    def valence(self, text: str) -> float:
        return self.analyzer.polarity_scores(text)["compound"]


class AfinnSentiment(LexiconJudge):
    """AFINN-165's lexicon (Nielsen 2011; PyPI `afinn`, lexicon included): the sum of the valences (−5..5) of the
    text's words, no rules. A second sentiment judge that nothing in the paper comparison trains on, so a
    policy that learned VADER's quirks rather than positive text shows up as a gap between the two."""

    name = "afinn"

    def __init__(self, on: str = "text"):
        from afinn import Afinn

        super().__init__(on)
        self.analyzer = Afinn(language="en")

    def valence(self, text: str) -> float:
        return self.analyzer.score(text)


class SequenceClassifier:
    """A Hugging Face `AutoModelForSequenceClassification` as a judge: the logit when the model has one
    label (a reward model), else softmax probability of `label` (a name or an index)."""

    name = "reward-model"

    def __init__(self, model: str, *, label: str | int | None = None, batch_size: int = 32, max_length: int = 512,
                 device: str = "auto", on: str = "text", revision: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        src = resolve(model)
        if src.kind not in ("hub", "dir"):
            raise ConfigError(f"{model}: a judge model must be a hub id or a Hugging Face directory")
        local = local_files_only(src, revision)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src.path, revision=revision, local_files_only=local)
            # safetensors only, as every model dpokit loads: a .bin checkpoint is a pickle
            self.model = AutoModelForSequenceClassification.from_pretrained(src.path, revision=revision,
                                                                            local_files_only=local,
                                                                            use_safetensors=True)
        except (OSError, ValueError) as e:
            raise DpokitError(f"cannot load judge model {model!r}: {str(e).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # a text over max_length loses its beginning, as dpokit's training shortens the prompt: the reward is
        # read at the reply's end, which must stay
        self.tokenizer.truncation_side = "left"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # a model `dpokit reward` exported read its reward at each reply's EOS, which its training appends (the
        # same token as the text's last where the pad token is the EOS): the judge scores the same text
        self.eos = (self.tokenizer.eos_token if src.kind == "dir" and (Path(src.path) / FINAL_METRICS).is_file()
                    else None)
        self.model.to(pick_device(device)).eval()
        self.label = self._label_index(label)
        self.batch_size, self.max_length, self.on = batch_size, max_length, on
        judged_text("", "", on)

    def _label_index(self, label: str | int | None) -> int | None:
        n = self.model.config.num_labels
        if n == 1:
            return None
        names = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label is None:  # a sentiment classifier: its positive label, else the last one
            return next((i for name, i in names.items() if name.startswith("pos")), n - 1)
        if isinstance(label, int) or str(label).isdigit():
            index = int(label)
            if not 0 <= index < n:
                raise ConfigError(f"judge label {index} is out of range: the model has {n} labels")
            return index
        if str(label).lower() not in names:
            raise ConfigError(f"judge label {label!r} is not one of the model's labels: {', '.join(names)}")
        return names[str(label).lower()]

    def text(self, prompt: Prompt, completion: str) -> str:
        text = self._text(prompt, completion)
        return text + self.eos if self.eos and not text.endswith(self.eos) else text

    def _text(self, prompt: Prompt, completion: str) -> str:
        if isinstance(prompt, list):
            messages = prompt + [{"role": "assistant", "content": completion}]
            if getattr(self.tokenizer, "chat_template", None):
                # ending at the end-of-turn token, as dpokit tokenizes a reply (the template's newline after it is
                # never generated): a dpokit reward model pools where it was trained, at the reply's last token
                return self.tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
            return prompt_text(messages) if self.on == "text" else completion
        return judged_text(prompt, completion, self.on)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        # a chat template writes its own start token: the tokenizer adds none to it, as dpokit's training does
        templated = [isinstance(p, list) and bool(getattr(self.tokenizer, "chat_template", None)) for p in prompts]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch, chat = texts[start:start + self.batch_size], templated[start:start + self.batch_size]
            if len(set(chat)) > 1:  # prompts of both kinds in one batch: one text at a time
                out += [s for i in range(len(batch)) for s in self.score(prompts[start + i:start + i + 1],
                                                                          completions[start + i:start + i + 1])]
                continue
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 add_special_tokens=not chat[0], return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()
            if self.label is None:
                out += logits[:, 0].tolist()
            else:
                out += logits.softmax(-1)[:, self.label].tolist()
        return out


class WordLength:
    """Completion length in words (`unit=words`) or characters; with `target`, -|length - target|."""

    name = "length"

    def __init__(self, unit: str = "words", target: float | None = None):
        if unit not in ("words", "chars"):
            raise ConfigError(f"length judge: unit must be words or chars; got {unit!r}")
        self.unit, self.target = unit, target

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        lengths = [float(len(c.split()) if self.unit == "words" else len(c)) for c in completions]
        return lengths if self.target is None else [-abs(n - float(self.target)) for n in lengths]


class KeywordCount:
    """Whole-word, case-insensitive occurrences of `words` (a list or comma-separated) in the completion,
    each weighted by `weight` (negative to penalise)."""

    name = "keywords"

    def __init__(self, words: str | list[str] = (), weight: float = 1.0):
        items = [w.strip() for w in (words.split(",") if isinstance(words, str) else words) if str(w).strip()]
        if not items:
            raise ConfigError("keywords judge needs words=... (comma-separated)")
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(str(w)) for w in items) + r")\b", re.IGNORECASE)
        self.weight = float(weight)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [self.weight * len(self.pattern.findall(c)) for c in completions]


class CallableJudge:
    """A user function as a judge: `fn(prompt, completion) -> float`, or `fn(prompts, completions) -> list`
    when marked `fn.batched = True`."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.batched = bool(getattr(fn, "batched", False))

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list:
        """The function's values as it returns them (`checked_scores` checks them); an exception in it is
        one line naming the judge and the row, with the user's frames of the traceback."""
        if self.batched:
            return list(self._call(list(prompts), list(completions), row=None))
        return [self._call(p, c, row=k) for k, (p, c) in enumerate(zip(prompts, completions), 1)]

    def _call(self, prompt, completion, *, row: int | None):
        try:
            return self.fn(prompt, completion)
        except Exception as e:
            frames = traceback.extract_tb(e.__traceback__)[1:]  # below this call: the user's own code
            where = f" on row {row}" if row is not None else ""
            raise UserCodeError(f"judge {self.name} raised {type(e).__name__}{where}: {e}",
                                "Traceback of the judge (most recent call last):\n"
                                + "".join(traceback.format_list(frames))) from e


def _sentiment(model: str | None = None, **options) -> Judge:
    return VaderSentiment(**options) if model is None else SequenceClassifier(model, **options)


def _llm(local_model: str | None = None, **options) -> Judge:
    return build_llm_judge(local_model, **options)


def _reward_model(model: str | None = None, **options) -> Judge:
    if model is None:
        raise ConfigError("the reward-model judge needs a model: --judge-model PATH_OR_HUB_ID")
    return SequenceClassifier(model, **options)


JUDGES: dict[str, Callable[..., Judge]] = {
    "sentiment": _sentiment,
    "afinn": AfinnSentiment,
    "reward-model": _reward_model,
    "length": WordLength,
    "keywords": KeywordCount,
    "llm": _llm,  # --judge-model is its local model; --judge-option model= names an endpoint's model
}


def _options_of(spec: str, model: str | None) -> list[str]:
    """The --judge-option keys the built-in judge `spec` takes (with its --judge-model `model`)."""
    target = {"sentiment": VaderSentiment if model is None else SequenceClassifier, "reward-model": SequenceClassifier,
              "llm": build_llm_judge}.get(spec, JUDGES[spec])
    skip = {"self", "model", "local_model"} if spec != "llm" else {"local_model"}
    return [name for name, p in inspect.signature(target).parameters.items()
            if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def parse_options(items: Sequence[str], where: str) -> dict[str, Any]:
    """`key=value` judge settings (`--judge-option`, `ppo.judge_options`) → a dict, each value read as YAML."""
    options = {}
    for item in items:
        key, raw = split_assignment(item, where, "key=value")
        options[key] = yaml_value(raw, f"{where} {key}")
    return options


def configured_judge(spec: str, model: str | None, options: Sequence[str], where: str) -> Judge:
    """The judge a config section names (`ppo.judge`, `online.judge`, `train.sample_judge`): its spec, its model
    and its `key=value` options (`<where>_options`)."""
    return build_judge(spec, model=model, options=parse_options(options, f"{where}_options"))


def check_scoring_judge(spec: str | None, options: Sequence[str], where: str, *, pairwise_ok: bool = False) -> None:
    """A judge named in a config that must score each completion (PPO's reward, the samples during
    training): its options parse, and it is not the llm judge comparing pairs (its default) unless
    `pairwise_ok` (online DPO ranks a prompt's samples by their comparisons)."""
    if spec is None:
        return
    parsed = parse_options(options, f"{where}_options")
    if spec == "llm":  # its options do not depend on a model: named wrong, say so before anything loads
        valid = _options_of(spec, None)
        unknown = sorted(set(parsed) - set(valid))
        if unknown:
            raise ConfigError(f"{where}_options: judge llm: unknown option {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], valid)}; its options: {', '.join(valid)}")
    if spec == "llm" and parsed.get("mode", "pairwise") != "score" and not pairwise_ok:
        raise ConfigError(f"{where} scores each completion: the llm judge compares pairs unless {where}_options "
                          "has mode=score")


def build_judge(spec: str, *, model: str | None = None, options: dict[str, Any] | None = None) -> Judge:
    """A judge by name (`sentiment`, `reward-model`, `length`, `keywords`) or a `module:function` spec."""
    options = dict(options or {})
    if spec in JUDGES:
        if model is not None and spec not in ("sentiment", "reward-model", "llm"):
            raise ConfigError(f"--judge-model does not apply to the {spec} judge")
        kwargs = dict(options, model=model) if spec in ("sentiment", "reward-model") else options
        if spec == "llm":
            kwargs = dict(options, local_model=model)
        valid = _options_of(spec, model)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"judge {spec}: unknown option {unknown[0]!r}{did_you_mean(unknown[0], valid)}; its "
                              f"options: {', '.join(valid) or 'none'}")
        try:
            judge = JUDGES[spec](**kwargs)
        except TypeError as e:
            raise ConfigError(f"judge {spec}: {e}") from None
        if spec == "sentiment" and model is not None:
            judge.name = "sentiment"
        return judge
    if ":" not in spec:
        match = difflib.get_close_matches(spec, list(JUDGES), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"unknown judge {spec!r}{hint}: use one of {', '.join(JUDGES)} or module:function")
    if model is not None or options:
        raise ConfigError("--judge-model and --judge-option apply to the built-in judges, not to module:function")
    target = load_callable(spec)
    if isinstance(target, type):
        target = target()
    if callable(getattr(target, "score", None)):  # an object that is a judge already
        if not isinstance(getattr(target, "name", None), str):
            target.name = spec
        return target
    if not callable(target):
        raise ConfigError(f"{spec} is not callable")
    return CallableJudge(target, spec)


def load_callable(spec: str) -> Any:
    """`package.module:attr` (importable, or found from the current directory) or `path/to/file.py:attr`."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"judge {spec!r} must look like module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"judge file not found: {path}")
            loader = importlib.util.spec_from_file_location(f"dpokit_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name.split(".")[0] or "" in sys.path:
                    raise
                sys.path.insert(0, "")  # a module in the working directory, as `python -m` would see it
                try:
                    module = importlib.import_module(module_name)
                finally:
                    sys.path.remove("")
    except ModuleNotFoundError as e:
        raise ConfigError(f"judge {spec!r}: cannot import {e.name}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"judge {spec!r}: {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def checked_scores(judge: Judge, prompts: Sequence[Prompt], completions: Sequence[str], *,
                   first_row: int = 1) -> list[float]:
    """`judge.score`, the one path every judge call takes: one finite number per completion, else a
    one-line error naming the judge and the row (numbered from `first_row`)."""
    scores = list(judge.score(prompts, completions))
    if len(scores) != len(completions):
        raise DpokitError(f"judge {judge.name} returned {len(scores)} scores for {len(completions)} completions")
    out = []
    for k, score in enumerate(scores, first_row):
        number = score.item() if hasattr(score, "item") and getattr(score, "ndim", 1) == 0 else score
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise DpokitError(f"judge {judge.name} returned {score!r} for row {k} (a number is needed)")
        if not math.isfinite(number):
            raise DpokitError(f"judge {judge.name} returned a non-finite score ({number}) for row {k}")
        out.append(float(number))
    return out


def score_rows(judge: Judge, rows: Sequence[dict], *, batch_size: int = 256) -> list[list[float]]:
    """Scores of every completion of every sample row (rows hold `prompt` and `completions`)."""
    flat = [(r["prompt"], c) for r in rows for c in r["completions"]]
    scores: list[float] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        scores += checked_scores(judge, [p for p, _ in chunk], [c for _, c in chunk], first_row=start + 1)
    out, k = [], 0
    for r in rows:
        out.append(scores[k:k + len(r["completions"])])
        k += len(r["completions"])
    return out
