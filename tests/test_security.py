"""Loading never runs code from the inputs: weights from safetensors only, no pickle, no remote code unless
the config asks, config values parsed as plain data."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from dpokit.errors import ConfigError, ModelError

SRC = Path(__file__).resolve().parents[1] / "src" / "dpokit"


# ------------------------------------------------------------------------------------ the code, read as code


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that could run code hidden in an input file."""
    tree = ast.parse(source, filename)
    found = []
    where = lambda node, what: found.append(f"{filename}:{node.lineno}: {what}")  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve"):
                    where(node, f"imports {name}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
                where(node, "imports torch.load by name (its calls cannot be checked)")
    for call in _calls(tree):
        name = _dotted(call.func)
        if name == "torch.load" and not _is_true(_kw(call, "weights_only")):
            where(call, "torch.load without weights_only=True")
        if name in ("eval", "exec", "compile", "__import__") and isinstance(call.func, ast.Name):
            if name == "__import__" and call.args and isinstance(call.args[0], ast.Constant):
                continue  # importing a fixed module name runs no input
            where(call, f"{name}()")
        if name in ("yaml.load", "yaml.load_all") and _dotted(_kw(call, "Loader") or ast.Name("?")) not in (
                "yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader"):
            where(call, f"{name} without a safe Loader")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            where(call, name)
        if name in ("np.load", "numpy.load") and _is_true(_kw(call, "allow_pickle")):
            where(call, "np.load(allow_pickle=True)")
        if _is_true(_kw(call, "trust_remote_code")):
            where(call, "trust_remote_code=True")
        # transformers falls back to a pickled pytorch_model.bin unless told not to (a GGUF file is no pickle)
        if (name.endswith(".from_pretrained") and name.split(".")[-2].startswith("AutoModel")
                and not _is_true(_kw(call, "use_safetensors")) and _kw(call, "gguf_file") is None):
            where(call, f"{name} without use_safetensors=True")
    return found


def test_the_checker_finds_what_it_looks_for():
    bad = ("import pickle\nimport torch, yaml\nfrom torch import load\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\neval(text)\nexec(text)\n"
           "yaml.load(text)\nyaml.load(text, Loader=yaml.Loader)\nyaml.unsafe_load(text)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=True)\nnp.load(f, allow_pickle=True)\n"
           "AutoModelForSequenceClassification.from_pretrained(p)\n")
    assert [int(f.split(":")[1]) for f in unsafe_calls(bad)] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # not 2
    good = ("import torch, yaml\ntorch.load(f, map_location='cpu', weights_only=True)\nmodel.eval()\n"
            "yaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\n"
            "AutoModel.from_pretrained(p, trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True)\n"
            "AutoModelForCausalLM.from_pretrained(d, gguf_file=name)\n"
            "__import__('dpokit.validate', fromlist=['x'])\n")
    assert unsafe_calls(good) == []


def test_no_code_in_src_unpickles_evaluates_or_trusts_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = [f for path in files for f in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))]
    assert found == []


# ------------------------------------------------------------------------------------------------- models


def _hf_dir(path: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(path)
    return path


class _Recorder:
    def __init__(self, result=None):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


class _FakeModel:
    hf_quantizer = None


def test_local_models_load_from_safetensors_without_remote_code(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit import models

    model_rec, tok_rec = _Recorder(_FakeModel()), _Recorder(type("Tok", (), {"pad_token": "x"})())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_rec)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tok_rec)
    path = str(_hf_dir(tmp_path / "m"))
    models.load_model(path)
    models.load_tokenizer(path)
    (_, kw), = model_rec.calls
    assert kw["use_safetensors"] is True and kw["trust_remote_code"] is False and kw["local_files_only"] is True
    (_, kw), = tok_rec.calls
    assert kw["trust_remote_code"] is False and kw["local_files_only"] is True

    models.load_model(path, trust_remote_code=True)
    models.load_tokenizer(path, trust_remote_code=True)
    assert model_rec.calls[-1][1]["trust_remote_code"] is True and tok_rec.calls[-1][1]["trust_remote_code"] is True


def test_pickled_weights_are_refused_unopened(tmp_path):
    """A directory with only pytorch_model.bin (a pickle) is an error; the pickle never runs."""
    from dpokit import models

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = _hf_dir(tmp_path / "m")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelError) as e:
        models.load_model(str(path))
    assert str(e.value).startswith(f"cannot load model '{path}': ")
    assert "safetensors" in str(e.value)
    assert not marker.exists()


def test_trust_remote_code_defaults_off_and_reaches_the_loaders(tiny_config, monkeypatch):
    from dpokit import models
    from dpokit.config import Config
    from dpokit.trainer import train

    assert Config().model.trust_remote_code is False
    real_tokenizer = models.load_tokenizer
    seen: dict[str, list[bool]] = {"tokenizer": [], "model": []}

    class Stop(Exception):
        pass

    def tokenizer(name, **kw):
        seen["tokenizer"].append(kw.get("trust_remote_code"))
        return real_tokenizer(name, revision=kw.get("revision"))

    def model(name, **kw):
        seen["model"].append(kw.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(models, "load_tokenizer", tokenizer)
    monkeypatch.setattr(models, "load_model", model)
    for flag in (False, True):
        cfg = tiny_config(*(["model.trust_remote_code=true"] if flag else []), "output.overwrite=true")
        with pytest.raises(Stop):
            train(cfg)
        assert seen == {"tokenizer": [flag], "model": [flag]}
        seen = {"tokenizer": [], "model": []}


# ------------------------------------------------------------------------------------------- configs and data


def test_yaml_tags_for_python_objects_are_refused(tmp_path, monkeypatch):
    from dpokit.config_loader import load_config

    monkeypatch.chdir(tmp_path)
    Path("cfg.yaml").write_text("model:\n  name: !!python/object/apply:pathlib.Path.touch ['pwned']\n")
    with pytest.raises(ConfigError) as e:
        load_config("cfg.yaml")
    assert str(e.value) == ("cfg.yaml:2: the YAML tag '!!python/object/apply:pathlib.Path.touch' is not allowed "
                            "(config values are plain data, never code)")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output.dir=!!python/object/new:pathlib.Path ['pwned']"])
    assert str(e.value) == ("override: output.dir: the YAML tag '!!python/object/new:pathlib.Path' is not allowed "
                            "(config values are plain data, never code)")
    assert not Path("pwned").exists()


def test_override_values_are_data_not_code(tmp_path, monkeypatch):
    from dpokit.config_loader import load_config

    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = load_config(None, ["data.train=pairs.jsonl", "output.dir=__import__('os').system('touch pwned')"])
    assert cfg.output.dir == "__import__('os').system('touch pwned')"
    with pytest.raises(ConfigError):
        load_config(None, ["data.train=pairs.jsonl", "train.lr=__import__('math').pi"])
    assert not Path("pwned").exists()


def test_a_dataset_directory_with_a_loading_script_runs_nothing(tmp_path):
    from dpokit.data.records import read_preferences
    from dpokit.errors import DataError

    marker = tmp_path / "pwned"
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "ds.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (ds / "train.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(DataError) as e:
        read_preferences(str(ds))
    assert str(e.value) == f"{ds}: cannot load as a dataset (Dataset scripts are no longer supported, but found ds.py)"
    assert not marker.exists()
