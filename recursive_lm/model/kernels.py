"""Which kernel computes attention and the dense projections, per backend.

The one place that maps `model.kernels.attention` / `model.kernels.dense` and
the backend ('cpu', 'gpu', 'tpu') to a function. `auto` keeps the measured CPU
choices on CPU (blocked attention with its hand-written backward, the
custom-VJP `layers.linear`) and takes the vendor kernels elsewhere:

  key                        auto on cpu   auto on gpu                 auto on tpu
  -------------------------  ------------  --------------------------  -------------------------
  model.kernels.attention    blocked       cudnn, or xla where cuDNN   splash, or xla where the
                                           cannot take the dtype /     installed jax lacks it
                                           head size (`cudnn_problem`)
  model.kernels.dense        custom_vjp    xla                         xla
  model.kernels.decode       single        single                      single
  model.moe.dispatch         loop          blocks                      megablox, or ragged where the
  (MoEUT models; resolved by                                           installed jax lacks it
  `dispatch.choose_dispatch`)

The choice is made once when a module is built (`choose`, `attention_kernel`,
`dense_kernel`), so the modules' `__call__` stays straight-line; a kernel the
backend or the installed jax cannot run is a ConfigError naming the key, the
backend and what would work, never a silent fallback. The kernels chosen are
logged once per distinct choice (absl INFO), so `auto` says what it picked.

Every attention kernel here computes the causal self-attention of a chunk
with itself (no KV cache; a chunk against the cache goes through
`attention.attend`, a single query, the decode step, through the
`decode_kernel`): q [B, T, K, G, Hd] pre-scaled, k/v
[B, T, K, Hd], positions [T] (consecutive: the index-based causal masks of the
vendor kernels equal the position masks), window None / 0 / this layer's
sliding window (a Python int, or a traced int32 inside a scan over depths)
-> [B, T, K, G, Hd].
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
from absl import logging

from recursive_lm.config import ATTENTION_KERNELS, ConfigError, ModelConfig
from recursive_lm.model import dispatch, layers
from recursive_lm.sharding import data_parallel

BACKENDS = ("cpu", "gpu", "tpu")
# Which explicit choices each backend can run ('xla' and 'blocked' are plain jax: every backend).
RUNS_ON = {"xla": BACKENDS, "blocked": BACKENDS, "cudnn": ("gpu",), "splash": ("tpu",),
           "custom_vjp": BACKENDS}
_SPLASH = "jax.experimental.pallas.ops.tpu.splash_attention"
# cuDNN flash attention (cuDNN 9): half-precision inputs, head dims a multiple of 8 up to 128.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Choice:
  """The kernels a model runs with, and why (one line for the log)."""
  backend: str
  attention: str
  dense: str
  why: str = ""
  moe: str = ""  # model.moe.dispatch of a MoEUT model ('' for models without experts)

  def describe(self) -> str:
    return (f"kernels on {self.backend}: attention={self.attention}, dense={self.dense}"
            + (f", moe dispatch={self.moe}" if self.moe else "") + (f" ({self.why})" if self.why else ""))


def backend_name(backend: str | None = None) -> str:
  """'cpu' | 'gpu' | 'tpu' (jax calls a CUDA or ROCm backend 'gpu'; other names pass through)."""
  name = backend or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def cudnn_problem(cfg: ModelConfig) -> str | None:
  """Why cuDNN flash attention cannot take this model's attention (None: it can)."""
  if cfg.compute_dtype not in CUDNN_DTYPES:
    return f"model.compute_dtype={cfg.compute_dtype!r} (cuDNN takes {' or '.join(CUDNN_DTYPES)})"
  if cfg.head_dim % 8 or cfg.head_dim > CUDNN_MAX_HEAD_DIM:
    return f"head_dim={cfg.head_dim} (cuDNN takes a multiple of 8 up to {CUDNN_MAX_HEAD_DIM})"
  return None


def cudnn_installed() -> str | None:
  """Why the installed jax has no usable cuDNN attention (None: it has)."""
  params = inspect.signature(jax.nn.dot_product_attention).parameters
  if "implementation" not in params or "local_window_size" not in params:
    return f"jax {jax.__version__} has no jax.nn.dot_product_attention(implementation=, local_window_size=)"
  return None


def splash_installed() -> str | None:
  """Why splash attention cannot be imported from the installed jax (None: it can)."""
  try:
    importlib.import_module(_SPLASH)
  except ImportError as e:
    return f"jax {jax.__version__} has no {_SPLASH} ({e})"
  return None


def _runs_on(choice: str) -> str:
  return "/".join(RUNS_ON[choice])


def choose(cfg: ModelConfig, backend: str | None = None) -> Choice:
  """Resolve model.kernels for `backend` (default: jax's). Raises ConfigError
  for a kernel the backend or the installed jax cannot run."""
  backend = backend_name(backend)
  att, dense, why = cfg.kernels.attention, cfg.kernels.dense, []
  if backend not in BACKENDS:
    raise ConfigError(f"model.kernels: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
  if att == "auto":
    if backend == "cpu":
      att = "blocked"
    elif backend == "gpu":
      problem = cudnn_problem(cfg) or cudnn_installed()
      att = "xla" if problem else "cudnn"
      why += [f"cudnn attention not used: {problem}"] if problem else []
    else:
      problem = splash_installed()
      att = "xla" if problem else "splash"
      why += [f"splash attention not used: {problem}"] if problem else []
  elif backend not in RUNS_ON[att]:
    works = [a for a in ATTENTION_KERNELS[1:] if backend in RUNS_ON[a]]
    raise ConfigError(f"model.kernels.attention={att!r} does not run on the {backend} backend (it runs on "
                      f"{_runs_on(att)}; on {backend} use one of {works} or 'auto')")
  elif att == "cudnn":
    problem = cudnn_problem(cfg) or cudnn_installed()
    if problem:
      raise ConfigError(f"model.kernels.attention='cudnn' cannot run this model on the {backend} backend: "
                        f"{problem}; use 'xla' or 'auto'")
  elif att == "splash":
    problem = splash_installed()
    if problem:
      raise ConfigError(f"model.kernels.attention='splash' is not available on the {backend} backend: {problem}; "
                        "use 'xla' or 'auto'")
  if dense == "auto":
    dense = "custom_vjp" if backend == "cpu" else "xla"
  moe = ""
  if cfg.block == "moeut":
    moe, moe_why = dispatch.choose_dispatch(cfg.moe.dispatch, backend)
    why += [moe_why] if moe_why else []
    problem = moe == "ragged_mgpu" and dispatch.mgpu_model_problem(cfg)
    if problem:
      raise ConfigError(f"model.moe.dispatch='ragged_mgpu' cannot run this model on the {backend} backend: "
                        f"{problem}; use 'blocks' or 'auto'")
  return Choice(backend, att, dense, "; ".join(why), moe)


_logged: set[Choice] = set()


def _log_once(choice: Choice) -> None:
  if choice not in _logged:
    _logged.add(choice)
    logging.info("%s", choice.describe())


def resolved(cfg: ModelConfig, backend: str | None = None) -> Choice:
  """`choose`, logged once per distinct choice (what a model build calls)."""
  choice = choose(cfg, backend)
  _log_once(choice)
  return choice


# ----------------------------------------------------------------------------
# Dense projections: y = x @ W.


def plain_linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., d_in] @ w [d_in, d_out] with jax's own autodiff (the accelerators' choice)."""
  return x @ w


DENSE_KERNELS = {"custom_vjp": layers.linear, "xla": plain_linear}


def dense_kernel(cfg: ModelConfig, backend: str | None = None):
  """The (x, w) -> x @ w function of this model's dense projections."""
  return DENSE_KERNELS[resolved(cfg, backend).dense]


# ----------------------------------------------------------------------------
# Decode attention: one query over the KV cache.


def decode_kernel(cfg: ModelConfig):
  """The attention of a single query over the cache (a decode step), or None
  for the general masked path (`attention.attend`). 'single' (= auto on every
  backend, plain jax): `attention.attend_one`, which builds no mask of the
  cache's size per query and reads only a sliding-window layer's window."""
  from recursive_lm.model.attention import attend_one  # attention.py builds its kernels from here
  return None if cfg.kernels.decode == "masked" else attend_one


# ----------------------------------------------------------------------------
# Causal self-attention kernels (see the module docstring for the shapes).


def attention_kernel(cfg: ModelConfig, backend: str | None = None, interpret: bool = False):
  """The causal self-attention function (q, k, v, positions, window) of this
  model. interpret: run Pallas kernels in interpret mode (tests on CPU; the
  backend check still applies, so tests pass backend='tpu')."""
  return _attention_fn(resolved(cfg, backend).attention, cfg.sliding_window, interpret)


@functools.lru_cache(maxsize=None)
def _attention_fn(name: str, sliding_window: int, interpret: bool):
  """One function object per choice, so modules built alike have equal static attributes."""
  from recursive_lm.model.attention import causal_attend_blocked  # attention.py builds its kernel from here
  if name == "blocked":
    return causal_attend_blocked
  if name == "splash":
    return functools.partial(splash_attend, sliding_window=sliding_window, interpret=interpret)
  return functools.partial(dot_product_attend, sliding_window=sliding_window, implementation=name)


def _by_window(fn, window, sliding_window: int):
  """fn(static_window) for this layer's window: None/0 global, else the model's
  sliding window. A traced window (scan over depths) picks one of the two
  compiled variants at run time with lax.cond (one branch runs)."""
  if window is None or not sliding_window:
    return fn(0)
  if isinstance(window, int):
    if window not in (0, sliding_window):
      raise ValueError(f"window {window} is neither 0 nor model.sliding_window={sliding_window}")
    return fn(window)
  return jax.lax.cond(jnp.asarray(window) == 0, lambda: fn(0), lambda: fn(sliding_window))


def dot_product_attend(q, k, v, positions, window=None, *, sliding_window: int = 0, implementation: str = "xla"):
  """Causal (optionally sliding-window) self-attention through
  jax.nn.dot_product_attention: cuDNN flash attention (implementation='cudnn')
  or its XLA lowering. GQA: the K*G query heads are passed K-major, matching
  jax's grouping of query head n onto key/value head n // G."""
  del positions  # consecutive: the index-based causal mask is the position mask
  b, t, kh, g, hd = q.shape

  def run(w: int):
    out = jax.nn.dot_product_attention(q.reshape(b, t, kh * g, hd), k, v, scale=1.0, is_causal=True,
                                       local_window_size=(w - 1, 0) if w else None, implementation=implementation)
    return out.reshape(b, t, kh, g, hd)

  return _by_window(run, window, sliding_window)


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, g: int, window: int, interpret: bool):
  """A splash MQA kernel for G query heads over one K/V head at length T (the
  mask is static: causal, or causal within `window`)."""
  sk = importlib.import_module(_SPLASH + ".splash_attention_kernel")
  sm = importlib.import_module(_SPLASH + ".splash_attention_mask")
  one = sm.LocalMask((t, t), (window - 1, 0), 0) if window else sm.CausalMask((t, t))
  block = 128 if t % 128 == 0 else t  # TPU tiles of 128, or the whole (short) sequence
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mqa(sm.MultiHeadMask([one] * g), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attend(q, k, v, positions, window=None, *, sliding_window: int = 0, interpret: bool = False):
  """Causal (optionally sliding-window) self-attention with the Pallas TPU
  splash kernel: one MQA call (G query heads on one K/V head) per batch row
  and K/V head, mapped with vmap; per batch shard under a mesh (shard_map).
  Scores in float32 inside the kernel."""
  del positions  # consecutive (see dot_product_attend)
  b, t, kh, g, hd = q.shape
  qh = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, Hd]
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, T, Hd]

  def run(w: int):
    kernel = _splash_kernel(t, g, w, interpret)
    # A Pallas call has no SPMD partitioning rule: under a mesh, each batch shard runs it locally.
    local = lambda q, k, v: (jax.vmap(jax.vmap(kernel))(q, k, v),)  # [B, K, G, T, Hd]
    return data_parallel(local, 3, (True,))(qh, kt, vt)[0]

  return jnp.transpose(_by_window(run, window, sliding_window), (0, 3, 1, 2, 4))
