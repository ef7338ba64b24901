"""llama.cpp on the same GGUF file: the CPU anchor of the generation benchmark (`generation.py`).

llama.cpp runs the file's own quantised weights (Q4_1 for the embedded SmolLM2) with its own kernels,
where dpokit dequantises them to float32 or bfloat16 for torch. Each cell decodes `batch` sequences at once
through llama-cpp-python's low-level API: one `llama_decode` for the prompts (each row's own, as plain
`generate` prefills them), then one a step with a token of each running sequence, each sequence in its own
KV stream. It samples at temperature 1 over the whole vocabulary with llama.cpp's own `dist` sampler and
stops a sequence at its first stop token, as dpokit's loop does. The prompts are the token ids the other rows use, so the samples can be scored the same way.
llama-cpp-python builds llama.cpp from source at install time (`pip install llama-cpp-python`, cmake and
a C++ compiler, ≈ 7 min on 2 cores); it is not one of dpokit's dependencies.
"""

from __future__ import annotations

import ctypes


def available() -> str | None:
    """None where llama-cpp-python can be imported, else why its rows are skipped."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama-cpp-python is not installed here (PyPI's package builds llama.cpp from source with cmake "
                "and a C++ compiler at install time; not part of dpokit's set-up)")
    return None


class Anchor:
    """One GGUF model loaded in llama.cpp, `threads` threads."""

    def __init__(self, gguf: str, threads: int, extra_buffers: bool = True):
        import llama_cpp as lc

        self.lc, self.threads = lc, threads
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: llama.cpp holds a pointer
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = lc.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, stop_ids, seed: int) -> list[list[int]]:
        """One completion a row, cut after its first stop token."""
        lc = self.lc
        rows, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        params = lc.llama_context_default_params()
        params.n_seq_max = rows
        params.kv_unified = False  # a KV stream a sequence: a token attends to its own sequence only
        params.n_ctx = rows * (width + max_new_tokens + 1)
        params.n_batch = max(sum(len(p) for p in prompt_ids), rows)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = lc.llama_init_from_model(self.model, params)
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))  # softmax at temperature 1, all tokens
        batch = lc.llama_batch_init(params.n_batch, 0, 1)
        try:
            # the prompts, logits at each one's last token
            n, outputs = 0, {}  # outputs: sequence → the place of its last token in the batch decoded last
            for s, ids in enumerate(prompt_ids):
                for j, token in enumerate(ids):
                    _put(batch, n, token, j, s, j == len(ids) - 1)
                    n += 1
                outputs[s] = n - 1
            batch.n_tokens = n
            self._decode(ctx, batch)
            position = [len(p) for p in prompt_ids]
            tokens: list[list[int]] = [[] for _ in prompt_ids]
            stops = set(stop_ids)
            running = list(range(rows))
            for step in range(max_new_tokens):
                for s in running:
                    tokens[s].append(lc.llama_sampler_sample(chain, ctx, outputs[s]))
                running = [s for s in running if tokens[s][-1] not in stops]
                if not running or step + 1 == max_new_tokens:
                    break
                for k, s in enumerate(running):
                    _put(batch, k, tokens[s][-1], position[s], s, True)
                    position[s] += 1
                batch.n_tokens = len(running)
                outputs = {s: k for k, s in enumerate(running)}
                self._decode(ctx, batch)
            return tokens
        finally:
            lc.llama_batch_free(batch)
            lc.llama_sampler_free(chain)
            lc.llama_free(ctx)

    def _decode(self, ctx, batch) -> None:
        code = self.lc.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def close(self) -> None:
        self.lc.llama_model_free(self.model)


def _put(batch, k: int, token: int, position: int, sequence: int, logits: bool) -> None:
    batch.token[k] = token
    batch.pos[k] = position
    batch.n_seq_id[k] = 1
    batch.seq_id[k][0] = sequence
    batch.logits[k] = ctypes.c_int8(logits).value
