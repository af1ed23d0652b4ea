"""python experiments/coca_decoding.py --size=base --repeats=5 --out=experiments/results/coca_decoding.json

CoCa caption decoding speed on the CPU (or a GPU: `--device=cuda`): key/value-cached vs uncached
greedy decoding in colearn_jax, and open_clip's CoCa `generate` measured in the same run (the benchmark
item of the "CoCa" issue: tokens/s for cached vs uncached decoding at the `base` size, 30 new tokens,
batch 8; cached must be at least 5x faster per token). CoCa: Yu et al. 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models", Sec. 3 (the captioning half: the multimodal text decoder
cross-attends to the image encoder's pooled tokens and generates the caption autoregressively).

  python experiments/coca_decoding.py --size=tiny --repeats=2      # seconds: a check of the script
  python experiments/coca_decoding.py --size=base --noopen_clip     # colearn_jax only
  python experiments/coca_decoding.py --size=base --device=cuda --out=/tmp/coca_decoding_gpu.json  # on a GPU

Setup (both sides random-initialised, fixed seeds; the numbers are speeds, not captions):
  model     `--size=base`: configs/coca.py:base (open_clip's coca_ViT-B-32 sizes: ViT-B/32 at 224 px,
            256-query attentional pooler, 12-layer 512-wide text tower and multimodal decoder, vocab
            49408); open_clip builds `create_model("coca_ViT-B-32", pretrained=None)`.
            `--size=tiny`: configs/coca.py:tiny (16 px, one layer per tower, byte vocabulary 259) with
            a 32-token text context (tiny's 24 is shorter than prompt + 30 tokens) and embed_dim 32
            (= the text width, as open_clip's decoder needs), and the open_clip CoCa of the same sizes.
  input     `--batch_size` (8) images of N(0, 1) pixels (the same array on both sides), prompt = the
            start-of-text token.
  decoding  greedy, exactly `--new_tokens` (30) new tokens per row: EOS is banned until the last
            token, which is EOS (DecodeConfig(min_new_tokens=30, eos_at_max_length=True); open_clip:
            seq_len=31, min_seq_len=30, fixed_output_length=True, whose loop forces EOS at the last
            position). Both make 30 forward passes of the text side: prefill + 29 cached steps, or 30
            passes over the prefix.
  colearn   `colearn_jax.decoding.generate` (one jitted program) with
              cached    `models.coca.decode_fns(model, 31)`: the image is encoded in prefill and each
                        step runs one token per row against the key/value cache;
              uncached  `decode_fns(model, 31, cached=False)`: the image is encoded once (prefill)
                        and each step re-runs the text tower and the decoder on the whole prefix, as
                        open_clip does; the prefix is padded to 31 tokens (static shapes), where
                        open_clip's grows from 1 to 30 (so ours does more text-side work per step).
            Each is lowered and compiled ahead of time (compile time reported separately, not timed),
            then run once untimed (warm-up).
  open_clip `CoCa.generate(images, generation_type="top_k", top_k=1, ...)`, open_clip's greedy path:
            TopKLogitsWarper(1) leaves one finite logit, so `torch.multinomial` draws the argmax; the
            image is encoded once, then every step re-runs the text tower and the decoder on the
            prefix (no cache), eager PyTorch in float32, `torch.set_num_threads(--threads)`.
            open_clip 3.3's `generate` needs transformers < 5 (it imports BeamSearchScorer with the
            logits processors it uses), so it runs in a worker subprocess with transformers 4.x first
            on its path (`colearn_jax.open_clip_env`); one untimed warm-up call.
  timing    `--repeats` rounds, each timing one full `generate` call of every side in turn (cached,
            uncached, open_clip), so background load hits all alike; the median per side is reported.
            tokens/s = batch * new_tokens / median time; ms/token = its inverse; ms/step = median
            time / new_tokens (one token for every row); speed-up = uncached (or open_clip) time /
            cached time, i.e. the per-token speed ratio.
  threads   JAX runs on the CPU (JAX_PLATFORMS=cpu unless set), its XLA client on every core this
            process may run on; torch gets the same count (`--threads`, 0 = that count). Before either
            runtime starts, glibc is told to keep freed memory (`colearn_jax.host_memory`, both
            processes; as experiments/benchmark.py).
  device    `--device=cuda`: open_clip's model and images on the GPU (each timed call ends with
            `torch.cuda.synchronize`; torch's float32 defaults, whose matmul precision is recorded), and
            JAX on its default backend (the GPU, unless JAX_PLATFORMS says otherwise), without
            preallocating (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set: the worker shares the GPU).

Prints a table and writes JSON (`--out`) with the per-repeat times, compile times, parameter counts,
checks (cached tokens == uncached tokens; every row made `--new_tokens` tokens; open_clip's model has
as many parameters as colearn_jax's: 253,560,065 at base), open_clip's `rows_ended_early` (rows whose
argmax was the padding id 0, which open_clip takes for an ended row and pads after; it still runs the
whole batch every step, so the time is unaffected) and the environment (jax / torch / open_clip /
transformers versions, device, CPU count, load average). If open_clip's worker does not start,
colearn_jax's sides are timed alone and the JSON's `open_clip_error` says why.
"""
from __future__ import annotations

import dataclasses

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = ("tiny", "base")
TINY_CONTEXT = 32  # configs/coca.py:tiny has 24 text positions; prompt + 30 new tokens need 31
WORKER_TAG = "@@coca_decoding@@ "  # the worker's protocol lines on stdout start with this

if __name__ == "__main__":  # flags only when run as a script (tests import the functions)
    from absl import flags

    flags.DEFINE_enum("size", "base", list(SIZES), "configs/coca.py preset whose sizes to build.")
    flags.DEFINE_integer("batch_size", 8, "Images captioned per generate call.")
    flags.DEFINE_integer("new_tokens", 30, "Tokens generated per image (exactly: EOS cannot end a row early).")
    flags.DEFINE_integer("repeats", 5, "Timed rounds (one generate call per side each); medians are reported.")
    flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the images.")
    flags.DEFINE_integer("threads", 0, "torch threads; 0 = the cores this process may use (XLA's count).")
    flags.DEFINE_bool("open_clip", True, "Also time open_clip's CoCa.generate (in a subprocess).")
    flags.DEFINE_string("device", "cpu", "torch device of open_clip's side (cpu | cuda). With cpu, JAX runs on the "
                        "CPU too (JAX_PLATFORMS=cpu unless set); otherwise on its default backend.")
    flags.DEFINE_string("out", os.path.join(ROOT, "experiments/results/coca_decoding.json"),
                        "Write the results as JSON here ('' = do not write).")
    flags.DEFINE_string("worker", "", "Internal: run the open_clip worker with this JSON spec.")


# ----------------------------------------------------------------------------- shared set-up
def usable_cpus() -> int:
    """The cores this process may run on (XLA:CPU sizes its thread pool by them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_config(size: str):
    """configs/coca.py:<size>. tiny: with a TINY_CONTEXT-token text context and embed_dim = the text
    width (open_clip's decoder cross-attends to memory of its own width; ours projects any)."""
    from colearn_jax.configs import coca as coca_configs  # noqa: PLC0415

    config = coca_configs.get_config(size)
    if size == "tiny":
        config.unlock()
        config.model.text.context_length = TINY_CONTEXT
        config.data.context_length = TINY_CONTEXT
        config.model.embed_dim = config.model.text.width
        config.lock()
    return config


def special_ids(config) -> dict:
    """Start / end / padding ids of the config's tokenizer (CLIP BPE: 49406 / 49407 / 0; bytes:
    257 / 258 / 0)."""
    if config.data.tokenizer == "clip_bpe":
        return {"sot": 49406, "eos": 49407, "pad": 0}
    if config.data.tokenizer == "byte":
        return {"sot": 257, "eos": 258, "pad": 0}
    raise ValueError(f"No special ids for tokenizer {config.data.tokenizer!r}.")


def open_clip_model_cfg(config) -> dict:
    """open_clip's CoCa model config of the same sizes as `config` (configs/coca.py's base gives the
    coca_ViT-B-32 JSON's values)."""
    m = config.model
    v, t, d = m.vision, m.text, m.decoder
    if m.pooler != "open_clip" or v.width % v.heads:
        raise ValueError("open_clip_model_cfg needs model.pooler='open_clip' and heads dividing the ViT width.")
    return {
        "embed_dim": m.embed_dim,
        "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "attentional_pool": True,
                       "attn_pooler_queries": m.num_queries, "attn_pooler_heads": m.pooler_heads,
                       "output_tokens": True},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                           "heads": d.heads, "layers": d.layers, "mlp_ratio": d.mlp_ratio,
                           "attn_pooler_heads": m.pooler_heads},
    }


def make_images(batch_size: int, image_size: int, seed: int):
    """float32 [B, 3, H, W] N(0, 1) pixels (NCHW, torch's layout; the JAX side transposes)."""
    import numpy as np  # noqa: PLC0415

    return np.random.RandomState(seed).randn(batch_size, 3, image_size, image_size).astype(np.float32)


def summarize(times: list[float], batch_size: int, new_tokens: int) -> dict:
    med = statistics.median(times)
    return {"times_s": [round(t, 5) for t in times], "median_s": round(med, 5),
            "ms_per_step": round(1000 * med / new_tokens, 3),
            "ms_per_token": round(1000 * med / (batch_size * new_tokens), 3),
            "tokens_per_s": round(batch_size * new_tokens / med, 2)}


# ----------------------------------------------------------------------------- colearn_jax side
class ColearnDecoder:
    """One compiled `decoding.generate` of CoCa, cached or uncached (module docstring)."""

    def __init__(self, model, variables, images, prompt, decode_config, cached: bool):
        import jax  # noqa: PLC0415

        from colearn_jax import decoding  # noqa: PLC0415
        from colearn_jax.models.coca import decode_fns  # noqa: PLC0415

        self.name = "cached" if cached else "uncached"
        self.args = (variables, images, prompt)
        fns = decode_fns(model, prompt.shape[1] + decode_config.max_new_tokens, cached, decode_config.pad_id)
        t0 = time.perf_counter()
        lowered = decoding.generate.lower(*fns, variables, images, prompt, decode_config)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self._block = jax.block_until_ready

    def run(self):
        return self._block(self.compiled(*self.args))

    def time_once(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0


def build_colearn(size: str, batch_size: int, new_tokens: int, seed: int) -> dict:
    """Model, random variables, images, prompt and the two compiled decoders (each run once: the
    warm-up, whose outputs are returned for the checks)."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from colearn_jax import decoding  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415

    config = make_config(size)
    ids = special_ids(config)
    model = get_system("coca").build_model(config)
    size_px, ctx = config.model.vision.image_size, config.model.text.context_length
    if 1 + new_tokens > ctx:
        raise ValueError(f"prompt + {new_tokens} new tokens exceed the text context ({ctx}).")
    init_batch = {"image": jnp.zeros((1, size_px, size_px, 3)), "text": jnp.zeros((1, ctx), jnp.int32)}
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), init_batch))
    images = jnp.asarray(make_images(batch_size, size_px, seed).transpose(0, 2, 3, 1))
    prompt = jnp.full((batch_size, 1), ids["sot"], jnp.int32)
    cfg = decoding.DecodeConfig(max_new_tokens=new_tokens, eos_id=ids["eos"], pad_id=ids["pad"], method="greedy",
                                min_new_tokens=new_tokens, eos_at_max_length=True)
    decoders = [ColearnDecoder(model, variables, images, prompt, cfg, cached) for cached in (True, False)]
    warm = {d.name: d.run() for d in decoders}  # warm-up (untimed)
    # The fixed cost of a generate call (image encoder, prefill, first token): the same call with one new
    # token. (time(N) - time(1)) / (N - 1) is then the marginal cost of one more decoding step.
    one = dataclasses.replace(cfg, max_new_tokens=1, min_new_tokens=1)
    for cached in (True, False):
        d = ColearnDecoder(model, variables, images, prompt, one, cached)
        d.name += "_first_token"
        d.run()
        decoders.append(d)
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    return {"config": config, "ids": ids, "decoders": decoders, "warmup_outputs": warm, "params": int(params)}


def token_checks(outputs: dict, new_tokens: int) -> dict:
    """cached == uncached tokens, and every row generated exactly `new_tokens` tokens."""
    import numpy as np  # noqa: PLC0415

    c, u = (np.asarray(outputs[k].tokens) for k in ("cached", "uncached"))
    lengths = {k: np.asarray(o.lengths).tolist() for k, o in outputs.items()}
    return {"cached_equals_uncached": bool(np.array_equal(c, u)),
            "token_agreement": float((c == u).mean()),
            "all_rows_full_length": all(n == new_tokens for v in lengths.values() for n in v),
            "lengths": lengths}


# ----------------------------------------------------------------------------- open_clip side
def open_clip_worker(spec: dict) -> None:
    """Subprocess: builds open_clip's CoCa, answers "run" on stdin with one timed generate (JSON on
    stdout after WORKER_TAG), "quit" ends it. Imports no JAX."""
    from colearn_jax import host_memory  # noqa: PLC0415

    host_memory.configure_allocator(only_if_cpu=False)
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    import open_clip  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from open_clip import coca_model  # noqa: PLC0415

    def say(obj):
        sys.stdout.write(WORKER_TAG + json.dumps(obj) + "\n")
        sys.stdout.flush()

    if not coca_model._has_transformers:  # noqa: SLF001
        say({"error": f"open_clip could not import its transformers helpers (transformers {transformers.__version__})"})
        return
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    if spec["open_clip_name"]:
        model = open_clip.create_model(spec["open_clip_name"], pretrained=None)
        expected = open_clip.get_model_config(spec["open_clip_name"])
    else:
        model = coca_model.CoCa(**spec["model_cfg"])
        expected = None
    # open_clip leaves the decoder's vocabulary head (text_decoder.text_projection) as torch.empty
    # (MultimodalTransformer.init_parameters, which would draw it, is never called and fails if called):
    # drawn here as that method would, N(0, width^-1/2).
    head = model.text_decoder.text_projection
    with torch.no_grad():
        head.normal_(std=head.shape[0] ** -0.5, generator=torch.Generator().manual_seed(spec["seed"]))
    model.to(device).eval()
    build_s = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    images = torch.from_numpy(make_images(spec["batch_size"], spec["image_size"], spec["seed"])).to(device)
    ids, new = spec["ids"], spec["new_tokens"]
    kwargs = dict(generation_type="top_k", top_k=1, seq_len=1 + new, min_seq_len=new, fixed_output_length=True,
                  sot_token_id=ids["sot"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])

    def generate():
        t = time.perf_counter()
        out = model.generate(images, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, out

    _, out = generate()  # warm-up
    gen = out[:, 1:].cpu().numpy()
    ended_early = int(((gen[:, :-1] == ids["eos"]) | (gen[:, :-1] == ids["pad"])).any(axis=1).sum())
    say({"ready": True, "build_s": build_s, "params": sum(p.numel() for p in model.parameters()),
         "all_params_finite": finite, "output_shape": list(out.shape), "rows_ended_early": ended_early,
         "last_token_is_eos": bool((gen[:, -1] == ids["eos"]).all()),
         "model_cfg_matches_config": (None if expected is None else
                                      _cfg_subset_matches(spec["model_cfg"], expected)),
         "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                      "transformers": transformers.__version__, "numpy": np.__version__},
         "torch_threads": torch.get_num_threads(), "torch_device": str(device),
         "torch_device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         "torch_float32_matmul_precision": torch.get_float32_matmul_precision()})
    for line in sys.stdin:
        if line.strip() == "run":
            say({"seconds": generate()[0]})
        elif line.strip() == "quit":
            return


def _cfg_subset_matches(ours: dict, theirs: dict) -> dict:
    """For each field of `ours` that open_clip's named config sets: equal? (its defaults otherwise)."""
    return {f"{part}.{k}": ours[part][k] == theirs[part][k]
            for part in ("vision_cfg", "text_cfg", "multimodal_cfg") for k in ours[part] if k in theirs.get(part, {})}


class OpenClipSide:
    """The worker subprocess, driven one generate call at a time."""

    name = "open_clip"

    def __init__(self, spec: dict, timeout_s: float = 3600):
        from colearn_jax import open_clip_env  # noqa: PLC0415

        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(spec)}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=open_clip_env.subprocess_env(), cwd=ROOT)
        self.info = self._read()
        if "error" in self.info:
            self.close()
            raise RuntimeError(f"open_clip worker: {self.info['error']}")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"open_clip worker exited (code {self.proc.wait()}) before answering.")
            if line.startswith(WORKER_TAG):
                return json.loads(line[len(WORKER_TAG):])

    def time_once(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- the measurement
def measure(size: str = "tiny", batch_size: int = 8, new_tokens: int = 30, repeats: int = 5, seed: int = 0,
            threads: int = 0, with_open_clip: bool = True, device: str = "cpu", log=print) -> dict:
    """Builds and compiles everything, then `repeats` alternating rounds; returns the JSON report."""
    from colearn_jax import host_memory  # noqa: PLC0415

    malloc = host_memory.configure_allocator()  # before JAX starts its CPU client
    threads = threads or usable_cpus()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    import jax  # noqa: PLC0415

    t0 = time.perf_counter()
    built = build_colearn(size, batch_size, new_tokens, seed)
    log(f"colearn_jax: {built['params'] / 1e6:.1f}M params; compiled cached in {built['decoders'][0].compile_s:.1f} s, "
        f"uncached in {built['decoders'][1].compile_s:.1f} s ({time.perf_counter() - t0:.1f} s with init + warm-up)")
    config = built["config"]
    sides = list(built["decoders"])
    oc, open_clip_error = None, None
    if with_open_clip:
        spec = {"size": size, "batch_size": batch_size, "new_tokens": new_tokens, "seed": seed, "threads": threads,
                "device": device, "image_size": config.model.vision.image_size, "ids": built["ids"],
                "model_cfg": open_clip_model_cfg(config),
                "open_clip_name": "coca_ViT-B-32" if size == "base" else ""}
        t0 = time.perf_counter()
        try:
            oc = OpenClipSide(spec)
        except RuntimeError as e:  # the worker did not start: colearn_jax's figures stand alone
            open_clip_error = str(e)[-1000:]
            log(f"open_clip: not timed: {open_clip_error}")
        else:
            log(f"open_clip: {oc.info['params'] / 1e6:.1f}M params on {oc.info['torch_device']}, torch "
                f"{oc.info['torch_threads']} threads "
                f"(ready in {time.perf_counter() - t0:.1f} s with one warm-up generate)")
            sides.append(oc)
    times = {s.name: [] for s in sides}
    try:
        for r in range(repeats):
            for s in sides:
                times[s.name].append(s.time_once())
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    finally:
        if oc is not None:
            oc.close()
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    results = {k: summarize(v, batch_size, new_tokens) for k, v in times.items()}
    for d in built["decoders"]:
        results[d.name].update(compile_s=round(d.compile_s, 3), params=built["params"])
    checks = token_checks(built["warmup_outputs"], new_tokens)
    if oc is not None:
        results["open_clip"].update({k: oc.info[k] for k in (
            "params", "build_s", "all_params_finite", "output_shape", "rows_ended_early", "last_token_is_eos",
            "model_cfg_matches_config", "torch_threads", "torch_device", "torch_device_name",
            "torch_float32_matmul_precision")})
    if oc is not None:  # the same architecture on both sides
        checks["open_clip_params_equal"] = oc.info["params"] == built["params"]
    for name in ("cached", "uncached"):  # the per-step cost once the fixed cost is paid
        first = results.pop(f"{name}_first_token")
        results[name]["first_token_median_s"] = first["median_s"]
        results[name]["marginal_ms_per_step"] = round(
            1000 * (results[name]["median_s"] - first["median_s"]) / max(1, new_tokens - 1), 3)
    cached = results["cached"]["median_s"]
    speedups = {f"{k}_over_cached": round(results[k]["median_s"] / cached, 3) for k in results if k != "cached"}
    speedups["uncached_over_cached_per_step"] = round(
        results["uncached"]["marginal_ms_per_step"] / max(results["cached"]["marginal_ms_per_step"], 1e-9), 3)
    d = jax.devices()[0]
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(d), "device_kind": d.device_kind,
           "device_count": jax.device_count(), "host_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
           "torch_threads": threads, "torch_device": device, "host_malloc": malloc is not None,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "loadavg_1m_before": None if load_before is None else round(load_before, 2),
           "loadavg_1m_after": None if load_after is None else round(load_after, 2)}
    if oc is not None:
        env.update(oc.info["versions"])
    m = config.model
    return {
        "benchmark": "coca_decoding", "size": size, "batch_size": batch_size, "new_tokens": new_tokens,
        "repeats": repeats, "seed": seed, "image_size": m.vision.image_size,
        "model": {"vision": m.vision.to_dict(), "text": m.text.to_dict(), "decoder": m.decoder.to_dict(),
                  "embed_dim": m.embed_dim, "num_queries": m.num_queries, "scan": m.scan, "dtype": m.dtype},
        "decoding": {"method": "greedy", "prompt": "start token", **built["ids"], "min_new_tokens": new_tokens,
                     "open_clip_call": "generate(generation_type='top_k', top_k=1, seq_len=%d, min_seq_len=%d, "
                                       "fixed_output_length=True)" % (1 + new_tokens, new_tokens)},
        "results": results, "speedup": speedups,
        "checks": checks, "env": env, "open_clip_error": open_clip_error,
    }


def table(report: dict) -> str:
    rows = ["| decoding | median s / generate | ms / step | ms / token | tokens/s | time / cached |",
            "|---|---|---|---|---|---|"]
    cached = report["results"]["cached"]["median_s"]
    for name, r in report["results"].items():
        label = {"cached": "colearn_jax, KV cache", "uncached": "colearn_jax, no cache",
                 "open_clip": "open_clip generate (no cache)"}[name]
        rows.append(f"| {label} | {r['median_s']:.3f} | {r['ms_per_step']:.1f} | {r['ms_per_token']:.2f} | "
                    f"{r['tokens_per_s']:.1f} | {r['median_s'] / cached:.2f}x |")
    e = report["env"]
    rows.append(f"\n{report['size']}: batch {report['batch_size']}, {report['new_tokens']} new tokens, greedy, "
                f"median of {report['repeats']}; {e['backend']} ({e['device_kind']}), {e['usable_cpus']} usable of "
                f"{e['host_cpus']} CPUs, torch threads {e['torch_threads']} on {e.get('torch_device', 'cpu')}, "
                f"jax {e['jax']}"
                + (f", torch {e['torch']}, open_clip {e['open_clip']}, transformers {e['transformers']}"
                   if "torch" in e else "")
                + f"; load avg {e['loadavg_1m_before']} -> {e['loadavg_1m_after']}")
    s = report["speedup"]
    rows.append(f"marginal cost of one more step (time(N) - time(1 token)) / (N - 1): cached "
                f"{report['results']['cached']['marginal_ms_per_step']:.1f} ms, uncached "
                f"{report['results']['uncached']['marginal_ms_per_step']:.1f} ms -> "
                f"{s['uncached_over_cached_per_step']:.2f}x per token; end to end {s['uncached_over_cached']:.2f}x")
    c = report["checks"]
    rows.append(f"checks: cached tokens == uncached tokens: {c['cached_equals_uncached']} "
                f"(agreement {c['token_agreement']:.3f}); every row {report['new_tokens']} tokens: "
                f"{c['all_rows_full_length']}"
                + (f"; open_clip parameter count equal: {c['open_clip_params_equal']}"
                   if "open_clip_params_equal" in c else ""))
    if report.get("open_clip_error"):
        rows.append(f"open_clip not timed: its worker did not start: {report['open_clip_error']}")
    return "\n".join(rows)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.worker:
        open_clip_worker(json.loads(FLAGS.worker))
        return
    if FLAGS.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: both sides on the CPU
    else:  # JAX's default backend, sharing the accelerator with the torch worker: allocate as needed
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = measure(FLAGS.size, FLAGS.batch_size, FLAGS.new_tokens, FLAGS.repeats, FLAGS.seed, FLAGS.threads,
                     FLAGS.open_clip, FLAGS.device)
    print(table(report))
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    from absl import app

    app.run(main)
