"""dsv3 from Python: the C++ engine (DeepSeek-V3 architecture: MLA, DeepSeekMoE, MTP) as an extension module.

    import dsv3
    m = dsv3.Model("m/")                              # a hub directory: config.json + safetensors
    out = m.generate("Once upon a time", max_new_tokens=32)
    for piece in m.generate("Once", max_new_tokens=32, stream=True):
        print(piece, end="", flush=True)
    logits = m.logits([[5, 6, 7]])                    # np.float32 [B, T, V], no copy
    dsv3.train(config="configs/demo.json", data="data/", out="run/", steps=100, on_step=print)
    with m.serve(port=0, block=False) as srv:         # the OpenAI-compatible server, in this process
        print(srv.url)

Every call runs the same library functions as the `dsv3` command (no second implementation), releases the GIL
while it computes, and stops at Ctrl-C between tokens or steps. Engine errors raise dsv3.InputError (bad input:
files, configs, arguments; also a ValueError) or dsv3.Error, with the engine's one-line message.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

__version__ = "0.1.0"


def _prepare_environment() -> None:
    """Sets, before the extension loads OpenBLAS and OpenMP, what the dsv3 binary sets before it re-executes.

    OPENBLAS_CORETYPE: an OpenBLAS older than the CPU falls back to generic kernels (3-5x slower) and reads this
    variable only when it loads, so a child process loads the extension and says whether the fallback happened
    (the same test as the binary's). The kernels chosen decide the bits of every product: this is also what
    makes logits from Python equal `dsv3 logits` bit for bit. OMP_WAIT_POLICY=passive: training and serving
    interleave OpenMP and OpenBLAS regions, where spinning idle threads cost much on shared cores.
    """
    if os.environ.get("DSV3_BLAS_PROBE"):
        return
    if "OPENBLAS_CORETYPE" not in os.environ:
        # The child must find this same package even when it was imported through sys.path alone (not
        # PYTHONPATH or site-packages): otherwise the probe fails and this process keeps the slow kernels while
        # the binary switches, and the two compute different bits.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, DSV3_BLAS_PROBE="1", PYTHONPATH=root + (os.pathsep + path if path else ""))
        try:
            r = subprocess.run([sys.executable, "-c", "import dsv3._core as c; print(c.blas_coretype_fix())"],
                               env=env, capture_output=True, text=True, timeout=120)
            fix = r.stdout.strip() if r.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            fix = ""
        if fix:
            os.environ["OPENBLAS_CORETYPE"] = fix
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


_prepare_environment()

from . import _core  # noqa: E402  (after the environment above)

Error = _core.Error
InputError = _core.InputError
OverloadedError = _core.OverloadedError

_core.set_bundled_tokenizer_dir(os.path.join(os.path.dirname(__file__), "data", "tokenizers", "deepseek-v3"))

__all__ = ["Model", "Tokenizer", "Completion", "TextStream", "Server", "train", "serve", "Error", "InputError",
           "OverloadedError", "__version__"]

_DTYPES = {"auto": "auto", "f32": "f32", "float32": "f32", "fp32": "f32", "bf16": "bf16", "bfloat16": "bf16"}


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "auto"
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            raise InputError(f"dtype must be 'auto', 'f32' or 'bf16', got {dtype!r}") from None
    key = dtype.lower()
    if key not in _DTYPES:
        raise InputError(f"dtype must be 'auto', 'f32' or 'bf16', got {dtype!r}")
    return _DTYPES[key]


def _as_ids(ids: Any, what: str = "ids") -> np.ndarray:
    """Token ids as a C-contiguous int32 [B, T] array (a [T] input becomes [1, T])."""
    if isinstance(ids, str):
        raise InputError(f"{what} must be token ids (integers), not a string; encode text with the tokenizer")
    a = np.asarray(ids)
    if a.size == 0:
        raise InputError(f"{what} is empty")
    if a.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {a.dtype}")
    if a.ndim not in (1, 2):
        raise InputError(f"{what} must be [T] or [B, T], got shape {list(a.shape)}")
    if a.min() < 0 or a.max() > np.iinfo(np.int32).max:
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise InputError(f"token id {bad} in {what} is out of range")
    return np.ascontiguousarray(a.reshape(1, -1) if a.ndim == 1 else a, dtype=np.int32)


def _id_list(ids: Any, what: str) -> List[int]:
    return [int(x) for x in _as_ids(ids, what).reshape(-1)]


class Tokenizer:
    """Byte-level BPE tokenizer: the ids of Hugging Face `tokenizers`, its decoding, and chat templates rendered
    byte for byte as transformers renders them.

    path: a tokenizer.json file, a directory holding one (and tokenizer_config.json), or "deepseek-v3" for the
    tokenizer bundled with dsv3.
    """

    def __init__(self, path: Union[str, os.PathLike] = "deepseek-v3", *, _impl: Any = None):
        self._t = _impl if _impl is not None else _core.Tokenizer(os.fspath(path))

    def encode(self, text: str, *, add_special: bool = False, add_bos: bool = False) -> List[int]:
        """Token ids of text (as `dsv3 tokenize`). add_special: what the post-processor adds (HF
        add_special_tokens=True); add_bos: BOS first when tokenizer_config.json says add_bos_token."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return self._t.encode(text, add_special, add_bos)

    def encode_batch(self, texts: Sequence[str], *, add_special: bool = False) -> List[List[int]]:
        """encode() of every text, spread over the OpenMP threads."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"texts must be str, got {type(t).__name__}")
        return self._t.encode_batch(texts, add_special)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ids, as HF tokenizers decodes: unknown ids are skipped, invalid UTF-8 becomes U+FFFD."""
        return self._t.decode([int(x) for x in np.asarray(ids).reshape(-1)], skip_special)

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **variables: Any) -> Union[str, List[int]]:
        """Renders tokenizer_config.json's chat template for OpenAI-style messages exactly as transformers'
        apply_chat_template; variables become template variables (tools=..., ...). tokenize=True returns ids."""
        try:
            mj, vj = json.dumps(list(messages)), json.dumps(variables)
        except (TypeError, ValueError) as e:
            raise InputError(f"messages must be JSON-serializable: {e}") from None
        text = self._t.apply_chat_template_json(mj, add_generation_prompt, vj)
        return self.encode(text) if tokenize else text

    def token_to_id(self, token: str) -> Optional[int]:
        return self._t.token_to_id(token)

    def id_to_token(self, id: int) -> Optional[str]:
        return self._t.id_to_token(int(id))

    @property
    def bos_id(self) -> int:
        return self._t.bos_id

    @property
    def eos_id(self) -> int:
        return self._t.eos_id

    @property
    def vocab_size(self) -> int:
        return self._t.vocab_size

    @property
    def chat_template(self) -> str:
        return self._t.chat_template

    def __repr__(self) -> str:
        return f"dsv3.Tokenizer({self._t.source!r}, vocab_size={self.vocab_size})"


@dataclass
class Completion:
    """A finished generation: the new token ids (the prompt excluded), their text when a tokenizer is present,
    why it stopped ("stop": an end token; "length": max_new_tokens or the context) and timings."""
    ids: List[int]
    text: Optional[str]
    finish_reason: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    drafted: int = 0
    accepted: int = 0


class TextStream:
    """Iterator of text pieces of a generation running on an engine thread (complete UTF-8 only). After it is
    exhausted, `ids` holds the new token ids and `completion` the whole result. close() (or leaving a `with`
    block) cancels the generation at the next token."""

    def __init__(self, impl: Any, tokenizer: Tokenizer):
        self._s = impl
        self._tok = tokenizer
        self.completion: Optional[Completion] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return self._s.__next__()
        except StopIteration:
            if self.completion is None:
                st = self._s.stats
                ids = list(self._s.ids)
                self.completion = Completion(ids=ids, text=self._tok.decode(ids, skip_special=True), **st)
            raise

    @property
    def ids(self) -> List[int]:
        return list(self._s.ids)

    def close(self) -> None:
        self._s.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_servers: "weakref.WeakSet[Server]" = weakref.WeakSet()


class Server:
    """The OpenAI-compatible server (`dsv3 serve`) running in this process: continuous batching over the
    latent cache on the engine's threads. stop() (or leaving a `with` block) shuts it down; wait() blocks until
    Ctrl-C. The Model it serves is busy meanwhile (other calls on it raise dsv3.Error)."""

    def __init__(self, impl: Any):
        self._srv = impl
        _servers.add(self)

    @property
    def port(self) -> int:
        return self._srv.port

    @property
    def host(self) -> str:
        return self._srv.host

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients: http://HOST:PORT/v1"""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return self._srv.model_name

    @property
    def running(self) -> bool:
        return self._srv.running

    def wait(self) -> None:
        """Blocks until the server stops; Ctrl-C stops it and raises KeyboardInterrupt."""
        self._srv.wait()

    def stop(self) -> None:
        """Stops accepting, ends the engine thread and frees the KV cache; idempotent."""
        self._srv.stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@atexit.register
def _stop_servers() -> None:
    for s in list(_servers):
        s.stop()


class Model:
    """A model directory loaded on a device.

    path: a hub directory (config.json + safetensors, BF16, FP32 or FP8 block-scaled).
    device: "cpu", "cuda" or "cuda:N" (CUDA needs a package built with
        pip install . --config-settings=cmake.define.DSV3_CUDA=ON).
    dtype: weights kept in memory: "auto" (bf16 stays bf16, fp32 and fp8 become fp32), "f32" or "bf16".
    tokenizer: tokenizer path; default: the directory's tokenizer.json, else the bundled DeepSeek-V3 one.
    """

    def __init__(self, path: Union[str, os.PathLike], device: str = "cpu", dtype: Any = "auto",
                 tokenizer: Optional[Union[str, os.PathLike]] = None):
        self.path = os.fspath(path)
        if not isinstance(device, str):
            raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self._m = _core.Model(self.path, device, _dtype_name(dtype), os.fspath(tokenizer) if tokenizer else "")
        self._tok: Optional[Tokenizer] = None
        self._tok_error: Optional[str] = None

    # ---- description
    @property
    def config(self) -> Dict[str, Any]:
        """config.json of the model directory."""
        with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
            return json.load(f)

    @property
    def device(self) -> str:
        return self._m.device

    @property
    def vocab_size(self) -> int:
        return self._m.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self._m.max_position_embeddings

    @property
    def mtp_modules(self) -> int:
        return self._m.mtp_modules

    @property
    def total_params(self) -> int:
        return self._m.total_params

    @property
    def active_params(self) -> int:
        return self._m.active_params

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (loaded on first use; dsv3.InputError when none fits the vocabulary)."""
        if self._tok is None:
            if self._tok_error is not None:  # loading failed before: do not read the files again
                raise InputError(self._tok_error)
            try:
                self._tok = Tokenizer(_impl=self._m.tokenizer())
            except InputError as e:
                self._tok_error = str(e)
                raise
        return self._tok

    # ---- scoring
    def logits(self, ids: Any, *, mtp: bool = False) -> Any:
        """Full-sequence logits of token ids [B, T] (or [T]): float32 [B, T, V] (or [T, V]) over the engine's
        buffer, without a copy; the values `dsv3 logits` writes. mtp=True returns (logits, [mtp_1, ...]) where
        module k's array is [B, T - k, V] (row i consumes token i + k and predicts token i + k + 1)."""
        a = _as_ids(ids)
        squeeze = np.asarray(ids).ndim == 1
        outs = self._m.logits(a, mtp)
        if squeeze:
            outs = [o[0] for o in outs]
        return (outs[0], outs[1:]) if mtp else outs[0]

    def loglikelihood(self, ids: Any, continuation: Any = None) -> Any:
        """Log-probabilities of tokens under the model.

        loglikelihood(ids): float64 [B, T - 1] (or [T - 1]): entry t is log p(ids[t + 1] | ids[:t + 1]).
        loglikelihood(context, continuation): the summed log-probability of the continuation's tokens after the
        context (lists of ids, or strings encoded with the model's tokenizer), as lm-eval scores a choice.
        """
        if continuation is None:
            a = _as_ids(ids)
            lp = self._m.token_logprobs(a)
            return lp[0] if np.asarray(ids).ndim == 1 else lp
        ctx = self.tokenizer.encode(ids, add_bos=True) if isinstance(ids, str) else _id_list(ids, "context")
        cont = (self.tokenizer.encode(continuation) if isinstance(continuation, str)
                else _id_list(continuation, "continuation"))
        lp = self._m.token_logprobs(_as_ids(ctx + cont))[0]
        return float(lp[len(ctx) - 1:].sum())

    # ---- generation
    def _prompt_ids(self, prompt: Any) -> List[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            return self.tokenizer.encode(prompt, add_bos=True)  # as `dsv3 generate --prompt`
        return _id_list(prompt, "prompt")

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False,
                 stop_ids: Sequence[int] = (), speculative: Optional[str] = None, absorb: bool = True,
                 stream: bool = False) -> Union[Completion, TextStream]:
        """Generates from a prompt (text, encoded with BOS as `dsv3 generate --prompt`, or token ids) over the
        latent KV cache, with the options of `dsv3 generate`: temperature 0 is greedy; top_k 0 and top_p 1 are
        off; it stops after the end-of-sequence token unless ignore_eos (and after any of stop_ids).
        speculative="mtp" drafts with the MTP module (greedy; same output). stream=True returns a TextStream
        iterator of text pieces; otherwise a Completion."""
        ids = self._prompt_ids(prompt)
        if speculative not in (None, "none", "mtp"):
            raise InputError(f"speculative must be 'mtp' or None, got {speculative!r}")
        args = (ids, int(max_new_tokens), float(temperature), int(top_k), float(top_p), int(seed), bool(ignore_eos),
                _id_list(stop_ids, "stop_ids") if len(stop_ids) else [], bool(absorb), speculative or "none")
        if stream:
            tok = self.tokenizer
            return TextStream(self._m.stream(*args), tok)
        out, st = self._m.generate(*args)
        text = None
        try:
            text = self.tokenizer.decode(out, skip_special=True)
        except InputError:
            if isinstance(prompt, str):
                raise
        return Completion(ids=list(out), text=text, **st)

    def chat(self, messages: Sequence[Dict[str, Any]], max_new_tokens: int = 512, **options: Any
             ) -> Union[Completion, TextStream]:
        """generate() over the model's chat template with the generation prompt added (as `dsv3 chat` and the
        server's /v1/chat/completions render it); options as for generate()."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(text), max_new_tokens, **options)

    # ---- serving
    def serve(self, host: str = "127.0.0.1", port: int = 8000, *, served_model_name: Optional[str] = None,
              max_batch: int = 32, kv_cache_tokens: int = 0, max_queue: int = 256, prefill_chunk: int = 512,
              default_max_tokens: int = 256, speculative: Optional[str] = None, block: bool = True) -> Server:
        """Starts the OpenAI-compatible server of `dsv3 serve` in this process (options as its flags; port 0
        picks a free port). block=True serves until Ctrl-C; block=False returns the running Server at once."""
        if speculative not in (None, "none", "mtp"):
            raise InputError(f"speculative must be 'mtp' or None, got {speculative!r}")
        srv = Server(_core.Server(self._m, str(host), int(port), served_model_name or "", int(max_batch),
                                  int(kv_cache_tokens), int(max_queue), int(prefill_chunk), int(default_max_tokens),
                                  speculative == "mtp"))
        if block:
            try:
                srv.wait()
            finally:
                srv.stop()
        return srv

    def __repr__(self) -> str:
        return f"dsv3.Model({self.path!r}, device={self.device!r}, params={self.total_params})"


def serve(path: Union[str, os.PathLike], host: str = "127.0.0.1", port: int = 8000, *, device: str = "cpu",
          dtype: Any = "auto", tokenizer: Optional[str] = None, **options: Any) -> Server:
    """dsv3.Model(path, device, dtype, tokenizer).serve(host, port, **options)."""
    return Model(path, device=device, dtype=dtype, tokenizer=tokenizer).serve(host, port, **options)


@dataclass
class TrainResult:
    """step: steps done in total; interrupted: stopped early (Ctrl-C or on_step returned False), after saving;
    checkpoint: the checkpoint directory (OUT/checkpoint), a hub directory that Model and transformers load."""
    step: int
    interrupted: bool
    checkpoint: str


def train(*, on_step: Optional[Callable[[Dict[str, Any]], Optional[bool]]] = None, resume: Optional[str] = None,
          stop_after: int = 0, report: bool = True, **options: Any) -> TrainResult:
    """Trains as `dsv3 train` does, with its options as keyword arguments (dashes become underscores):
    config, init_from, data, out, device, batch, seq, grad_accum, steps, tokens, lr, min_lr, warmup,
    lr_schedule, wsd_decay, beta1, beta2, eps, weight_decay, clip, bias_gamma, balance_alpha, mtp_lambda,
    eval_every, eval_batches, save_every, log_every, seed, save_dtype. Defaults are the CLI's.

    on_step(record) is called after every step with its metrics.jsonl record (type "train": step, loss,
    mtp_loss, lr, grad_norm, maxvio per MoE layer, load, tokens, tok_per_s, ...) and after every validation
    (type "val"); returning False stops the run, which saves. Ctrl-C saves the checkpoint, then raises
    KeyboardInterrupt. resume continues a run from its checkpoint exactly (given options override the saved
    ones); stop_after stops after this many steps of this call, keeping the schedule of steps.
    """
    given = {}
    for k, v in options.items():
        if v is None:
            continue
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        given[k.replace("_", "-")] = v
    try:
        opts = json.dumps(given)
    except (TypeError, ValueError) as e:
        raise InputError(f"training options must be numbers and strings: {e}") from None
    r = _core.train(opts, os.fspath(resume) if resume else "", int(stop_after), bool(report), on_step)
    return TrainResult(**r)
