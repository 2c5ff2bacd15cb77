"""Images/s of the NAT and DiNAT classifiers per attention backend: the paper's Tables 5, 6, 8.

  python -m benchmarks.model_throughput [--variants nat_mini,dinat_tiny]
      [--backends reference,naive,gemm,fused,dense] [--dtypes bf16,fp32] [--modes infer,train]
      [--batch 128] [--image-size 224] [--reps 10] [--time-limit-s 480]
      [--reference-max-params-m 60] [--fused-config FIELD=VALUE,...] [--out tp.json]
      [--md tp.md] [--quick]

Each row: one variant (natten_jax.models.CONFIGS, ImageNet-1k head, NHWC input, relative
positional biases off so that every backend runs the same model), one attention backend, one
computation dtype (parameters stay float32), one mode:

* ``infer``: the jitted forward (``deterministic=True``) on a batch;
* ``train``: one jitted step of :func:`natten_jax.models.training.train_step` (value_and_grad
  of the label-smoothed cross-entropy, AdamW update; stochastic depth on as in training).

Backends: ``reference`` (pure JAX), ``naive`` / ``gemm`` (unfused CUDA operators; only where
this natten_jax has them), ``fused`` (our fused kernels, configured by ``--fused-config``), and
``dense``: the same model with dense self-attention over every token (``dense_attention=`` of
the models; cuDNN for fp16/bf16 on a GPU, XLA otherwise, or ``--dense-impl``). A backend is
probed once per dtype on a tiny call; one that cannot run is listed with the reason and skipped.

Timing (benchmarks.harness.timing.time_calls): ahead-of-time compilation, warm-up calls, then
up to ``--reps`` calls each ended by ``block_until_ready`` (at most ``--budget-s`` seconds of
them); images/s = batch / median. Failures (out of memory, compile errors) are recorded in
their row and the run goes on; a CUDA error that leaves the device unusable stops it. No new
measurement starts after ``--time-limit-s``. The JSON and the markdown are rewritten after
every measurement, so a run killed from outside still leaves its tables. Order: variant by
variant (smallest first), then dtype, mode, backend (fused, dense, gemm, naive, reference), so
a time-limited run fills whole rows. ``--resume`` / ``--shard`` / ``--merge``:
benchmarks.harness.resume.

``--quick``: CPU smoke test (batch 2, 64x64, nat_mini with one layer per level, 1 rep).
"""

from __future__ import annotations

import os

# Before JAX loads: take GPU memory as needed (a failed big measurement must not pin 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.harness import cli, markdown as md, resume, results  # noqa: E402
from benchmarks.harness.aot import Compiled  # noqa: E402
from benchmarks.harness.flops import model_gmacs  # noqa: E402
from benchmarks.harness.run import Deadline, error_text, is_fatal, logger  # noqa: E402
from benchmarks.harness.timing import time_calls  # noqa: E402

VARIANTS = ("nat_mini", "nat_tiny", "nat_small", "nat_base",
            "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large")
BACKENDS = ("reference", "naive", "gemm", "fused", "dense")  # table column order
RUN_ORDER = ("fused", "dense", "gemm", "naive", "reference")  # most wanted first
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
MODES = ("infer", "train")
MODE_TITLES = {"infer": "Inference (jitted forward)",
               "train": "Training step (value_and_grad + AdamW)"}
NUM_CLASSES = 1000
LABEL_SMOOTHING = 0.1
UNAVAILABLE = "backend unavailable"
log = logger("throughput")


# ----------------------------------------------------------------------------- model and work
def model_config(variant: str, max_depth: int = 0) -> dict:
    """The official configuration; ``max_depth`` > 0 keeps at most that many layers per level
    (smoke tests), with the first dilations of each level."""
    from natten_jax.models import CONFIGS

    cfg = dict(CONFIGS[variant])
    if max_depth > 0:
        depths = tuple(min(d, max_depth) for d in cfg["depths"])
        cfg["depths"] = depths
        if cfg.get("dilations") is not None:
            cfg["dilations"] = tuple(tuple(dl[:n]) for dl, n in zip(cfg["dilations"], depths))
    return cfg


def dense_impl(dtype: str, choice: str = "auto") -> str:
    """jax.nn.dot_product_attention implementation of the dense baseline."""
    if choice != "auto":
        return choice
    on_gpu = jax.devices()[0].platform == "gpu"
    return "cudnn" if on_gpu and dtype in ("bfloat16", "float16") else "xla"


def build_model(variant: str, backend: str, dtype: str, args):
    """A fresh model (same seed, so the same parameters for every backend and dtype)."""
    from flax import nnx

    from natten_jax.models import NAT

    kw = dict(model_config(variant, args.max_depth), num_classes=NUM_CLASSES, rpb=False,
              dtype=jnp.dtype(dtype))
    if backend == "dense":
        kw["dense_attention"] = dense_impl(dtype, args.dense_impl)
    else:
        kw["backend"] = backend
        if backend == "fused":
            kw["backend_config"] = args.config
    return NAT(**kw, rngs=nnx.Rngs(0))


def probe_backend(backend: str, dtype: str, args) -> str:
    """"" if ``backend`` runs a tiny 2-D attention call in ``dtype`` here, else why not."""
    from benchmarks.harness.calls import na_fn
    from benchmarks.harness.problems import make_problem

    try:
        q = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 2, 32), jnp.dtype(dtype))
        if backend == "dense":
            impl = dense_impl(dtype, args.dense_impl)
            flat = q.reshape(1, 64, 2, 32)
            out = jax.jit(lambda x: jax.nn.dot_product_attention(x, x, x, implementation=impl))(
                flat)
        else:
            p = make_problem("probe", dict(batch=1, heads=2, spatial=[8, 8], kernel=[3, 3],
                                           dilation=[2, 2], head_dim=32))
            f = na_fn(p, backend, args.config)
            out = jax.jit(lambda x: f(x, x, x))(q)
        if not bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))):
            return "probe call returned non-finite values"
        return ""
    except ValueError as e:
        if "`backend` must be" in str(e):
            return f"this natten_jax has no backend {backend!r}"
        return error_text(e)
    except Exception as e:  # noqa: BLE001 - NotImplementedError, missing kernels, cuDNN errors
        return error_text(e)


def inference_call(model, batches) -> Compiled:
    """() -> logits of the next batch, through one jitted pure function of the model state."""
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, deterministic=True))
    it = {"i": 0}

    def args(peek=False):
        it["i"] += 0 if peek else 1
        return state, batches[it["i"] % len(batches)][0]

    return Compiled(fwd, args)


def train_call(model, batches) -> Compiled:
    """() -> loss of one training step on the next batch; model and optimizer state are carried
    from step to step (a jitted pure function of their split state)."""
    from flax import nnx

    from natten_jax.models import training

    model.train()
    optimizer = nnx.Optimizer(model, training.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        loss, _ = training.train_step(model, optimizer, images, labels,
                                      label_smoothing=LABEL_SMOOTHING)
        return nnx.state((model, optimizer)), loss

    carry = {"state": state, "i": 0}

    def args(peek=False):
        carry["i"] += 0 if peek else 1
        images, labels = batches[carry["i"] % len(batches)]
        return carry["state"], images, labels

    def keep(out):
        carry["state"], loss = out
        return loss, carry["state"]

    return Compiled(step, args, keep)


def make_batches(batch: int, image_size: int, dtype: str, n: int = 2):
    """``n`` (images [batch, S, S, 3] normal in ``dtype``, labels [batch] int32) on device."""
    key = jax.random.PRNGKey(1)
    out = []
    for _ in range(n):
        key, ki, kl = jax.random.split(key, 3)
        out.append((jax.random.normal(ki, (batch, image_size, image_size, 3), jnp.dtype(dtype)),
                    jax.random.randint(kl, (batch,), 0, NUM_CLASSES, jnp.int32)))
    return jax.block_until_ready(out)


def measure_dense_fallback(variant, backend, dtype, mode, batches, args, row) -> dict:
    """:func:`measure`; where the dense cuDNN baseline rejects a shape (NotImplementedError, e.g.
    its training path at the last level's 7x7 = 49 tokens), the same model with XLA dense
    attention on the levels with an odd token count and cuDNN on the others ("cudnn_or_xla",
    named in ``row["impl"]``, the reason in ``row["fallback"]``; XLA on every level would
    materialise level 1's 3136 x 3136 logits)."""
    try:
        return measure(variant, backend, dtype, mode, batches, args)
    except NotImplementedError as e:
        if backend != "dense" or row.get("impl") != "cudnn":
            raise
        row["impl"] = "cudnn_or_xla"
        row["fallback"] = f"cuDNN: {type(e).__name__}: {str(e)[:160]}"
        return measure(variant, backend, dtype, mode, batches,
                       argparse.Namespace(**{**vars(args), "dense_impl": "cudnn_or_xla"}))


def measure(variant: str, backend: str, dtype: str, mode: str, batches, args) -> dict:
    """One row's numbers: {"ms", "images_per_s", "timing", "params"}."""
    from natten_jax.models import count_params

    model = build_model(variant, backend, dtype, args)
    params = count_params(model)
    call = (inference_call if mode == "infer" else train_call)(model, batches)
    del model
    t = time_calls(call, args.reps, args.warmup, args.budget_s, args.gpu_lock)
    return {"params": params, "ms": t["ms"], "images_per_s": args.batch / (t["ms"] / 1e3),
            "timing": t}


# -------------------------------------------------------------------------------- reporting
def _fmt_rate(x) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _speedup(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(report: dict) -> str:
    """One table per (mode, dtype): the paper's layout (model, params, FLOPs, images/s per
    backend, speedups of fused over reference and over dense), notes below it. Cells measured
    on another device than most are marked (a speedup needs both cells from one device),
    and cells whose timed calls spread widely get a "~" (benchmarks.harness.markdown)."""
    cfg, env = report["config"], report["env"]
    backends = [b for b in BACKENDS if b in report["backends"]]
    main_dev, marks = md.device_marks(r.get("device", env["device"])
                                      for r in report["rows"] if "ms" in r)
    main_dev = main_dev or env["device"]
    lines = [
        f"# NAT / DiNAT throughput ({main_dev}, batch {cfg['batch']}, "
        f"{cfg['image_size']}x{cfg['image_size']}, {env['date']})",
        "",
        f"jax {env['jax']}. Images/s = batch / median time of a jitted call (block_until_ready; "
        f"median of up to {cfg['reps']} calls after compile + {cfg['warmup']} warm-up). Models "
        "without relative positional biases (every backend runs the same model); parameters "
        "float32, computation in the dtype named. GMACs: multiply-accumulates per image (the "
        "papers' FLOPs). dense: the same model with dense self-attention "
        "(jax.nn.dot_product_attention). Fused backend: "
        f"{_config_text(cfg.get('fused_config'))}."
        + (f" Layers per level capped at {cfg['max_depth']}." if cfg.get("max_depth") else ""),
        "",
    ]
    skipped = {f"{b} ({DTYPE_SHORT.get(d, d)})": why for b, per in report["backends"].items()
               for d, why in per.items() if why}
    if skipped:
        lines += ["Backends not run: " + "; ".join(f"{k}: {v[:120]}" for k, v in skipped.items()),
                  ""]
    rows = report["rows"]
    any_wide = False
    for mode in MODES:
        for dtype in DTYPES:
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            if not sel:
                continue
            impl = {r["backend"]: r.get("impl") for r in sel if r.get("impl")}
            head = [f"{b} ({impl[b]})" if b in impl else b for b in backends]
            lines += [f"## {MODE_TITLES[mode]}, {DTYPE_SHORT[dtype]}: images/s", "",
                      *md.table(["model", "params (M)", "GMACs", *head, "fused vs reference",
                                 "fused vs dense"], [])]
            notes = {}  # reason -> the cells it applies to
            for variant in report["variants"]:
                by = {r["backend"]: r for r in sel if r["variant"] == variant}
                if not by:
                    continue
                rate = {b: r.get("images_per_s") for b, r in by.items()}
                dev = {b: r.get("device", env["device"]) for b, r in by.items()}
                params = next((r["params"] for r in report["rows"]
                               if r["variant"] == variant and r.get("params")), None)
                cells = [f"{params / 1e6:.1f}" if params else "-",
                         f"{next(iter(by.values()))['gmacs']:.2f}"]
                for b in backends:
                    if rate.get(b):
                        wide = md.spread_mark(by[b].get("timing"))
                        any_wide = any_wide or bool(wide)
                        cells.append(_fmt_rate(rate[b]) + wide + marks.get(dev[b], ""))
                        continue
                    cells.append("-")
                    why = (by.get(b) or {}).get("error") or (by.get(b) or {}).get("skipped")
                    if why and not why.startswith(UNAVAILABLE):  # listed once, above
                        notes.setdefault(why[:160], []).append(f"{variant} {b}")
                cells += [_speedup(rate.get("fused"), rate.get(b)) if dev.get("fused") == dev.get(b)
                          else "-" for b in ("reference", "dense")]
                lines.append(md.row([variant, *cells]))
            lines.append("")
            if notes:
                lines += ["Not measured: " + "; ".join(
                    md.cell(f"{', '.join(cells)}: {why}") for why, cells in notes.items()), ""]
    if any_wide:
        lines += [md.SPREAD_NOTE, ""]
    if marks:
        lines += [md.device_note(main_dev, marks), ""]
    st = report["status"]
    if report.get("merged"):
        n = sum("ms" in r for r in report["rows"])
        lines.append(f"{n} of {st['planned']} cells measured, merged from "
                     f"{len(report['merged']['files'])} runs.")
    else:
        lines.append(f"{st['done']} of {st['planned']} measurements in "
                     f"{st.get('elapsed_s', 0)} s"
                     + (f"; stopped: {st['stopped']}" if st.get("stopped") else "") + ".")
    return "\n".join(lines) + "\n"




def _config_text(config) -> str:
    """The fused backend's configuration of a run: the fields that differ from natten_jax's
    defaults (or "default configuration")."""
    if config is None:
        return "not recorded"
    from natten_jax import FusedConfig

    default = cli.config_json(FusedConfig())
    changed = [f"{k}={v}" for k, v in config.items() if default.get(k) != v]
    return ", ".join(changed) or "default configuration"


def write(report: dict, args) -> None:
    results.write_json(args.out, report)
    if args.md:
        results.write_text(args.md, markdown(report))


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", help=f"comma-separated of {','.join(VARIANTS)} (default all; "
                    "--quick: nat_mini)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated of reference,naive,gemm,fused,dense (default all)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="comma-separated of bfloat16,float16,float32 (or bf16,fp16,fp32); "
                    "default bfloat16,float32")
    ap.add_argument("--modes", default="infer,train", help="comma-separated of infer,train")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls, the compiling one "
                    "included")
    ap.add_argument("--budget-s", type=float, default=10.0,
                    help="stop the timed calls of one measurement after this many seconds")
    ap.add_argument("--time-limit-s", type=float,
                    default=float(os.environ.get("MODEL_BENCH_TIME_LIMIT_S", 480)),
                    help="start no new measurement after this many seconds (0: no limit; "
                    "default $MODEL_BENCH_TIME_LIMIT_S or 480)")
    ap.add_argument("--reference-max-params-m", type=float, default=0.0,
                    help="skip the reference backend on variants of more parameters than this "
                    "(millions; 0: no limit)")
    ap.add_argument("--dense-impl", default="auto",
                    choices=["auto", "cudnn", "xla", "cudnn_or_xla"],
                    help="implementation of the dense baseline (auto: cuDNN for fp16/bf16 on a "
                    "GPU, else XLA)")
    cli.add_fused_config(ap)
    ap.add_argument("--max-depth", type=int, default=0,
                    help="keep at most this many layers per level (smoke tests; 0: all)")
    ap.add_argument("--only", default="", help="comma-separated variant:mode[:backend[:dtype]] "
                    "(dtype as in --dtypes): measure just these of the grid, in the grid's order")
    ap.add_argument("--resume", action="append", default=[],
                    help="an earlier run's JSON (repeatable): its measured rows of the same batch "
                    "and image size are kept and not measured again")
    ap.add_argument("--shard", default="", help="i/n: measure every n-th of the rows left to "
                    "measure, from the i-th (n processes side by side, with --gpu-lock; put "
                    "their JSON files together with --merge)")
    ap.add_argument("--gpu-lock", default="", help="a file whose exclusive lock is held while "
                    "this process runs on the GPU (compilation happens outside it): processes "
                    "that share it compile side by side and time one at a time")
    ap.add_argument("--merge", action="store_true",
                    help="measure nothing: the table of the --resume files' rows (failed rows "
                    "included; a measured row wins over a failed one)")
    ap.add_argument("--out", help="JSON file (rewritten after every measurement)")
    ap.add_argument("--md", help="markdown tables (rewritten after every measurement)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke test: batch 2, 64x64, nat_mini with 1 layer per level, "
                    "1 rep, no time limit")
    a = ap.parse_args(argv)
    if a.quick:
        a.variants = a.variants or "nat_mini"
        a.batch, a.image_size, a.reps, a.warmup = 2, 64, 1, 1
        a.budget_s, a.time_limit_s = 1.0, 0.0
        a.max_depth = a.max_depth or 1
    a.variant_names = (cli.names(a.variants, VARIANTS, "--variants") if a.variants
                       else list(VARIANTS))
    a.backend_names = cli.names(a.backends, BACKENDS, "--backends")
    a.dtype_names = cli.names(a.dtypes, DTYPES, "--dtypes", DTYPE_ALIASES)
    a.mode_names = cli.names(a.modes, MODES, "--modes")
    a.only = [tuple(x.strip().split(":")) for x in a.only.split(",") if x.strip()]
    a.shard = resume.parse_shard(a.shard)
    if a.merge and not a.resume:
        raise SystemExit("--merge needs --resume files")
    for o in a.only:
        if not 2 <= len(o) <= 4 or o[0] not in VARIANTS or o[1] not in MODES or \
                (len(o) > 2 and o[2] not in BACKENDS):
            raise SystemExit(f"--only: bad entry {':'.join(o)!r} (variant:mode[:backend[:dtype]])")
    if not (a.variant_names and a.backend_names and a.dtype_names and a.mode_names):
        raise SystemExit("need at least one variant, backend, dtype and mode")
    a.config = cli.fused_config(a.fused_config)
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = results.env_info()
    report = {
        "env": env, "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {"batch": args.batch, "image_size": args.image_size, "reps": args.reps,
                   "warmup": args.warmup, "budget_s": args.budget_s,
                   "time_limit_s": args.time_limit_s, "max_depth": args.max_depth,
                   "dense_impl": args.dense_impl, "rpb": False,
                   "reference_max_params_m": args.reference_max_params_m,
                   "label_smoothing": LABEL_SMOOTHING,
                   "fused_config": cli.config_json(args.config)},
        "variants": args.variant_names,
        "backends": {b: {} for b in args.backend_names},  # backend -> dtype -> "" or why not
        "rows": [],
        "status": {"planned": 0, "done": 0, "stopped": None},
    }
    if args.shard:
        report["shard"] = "/".join(map(str, args.shard))
    order = [b for b in RUN_ORDER if b in args.backend_names]
    kept = resume.kept_rows(args.resume, row_key,
                            {"batch": args.batch, "image_size": args.image_size},
                            with_errors=args.merge)
    if args.merge:  # the table describes the machine the rows were measured on
        parts = [resume.load(path) for path in args.resume]
        report["env"] = parts[0]["env"]
        report["merged"] = {"files": args.resume, "elapsed_s": [
            p.get("status", {}).get("elapsed_s") for p in parts]}
    grid = plan(args, order, kept)
    report["status"]["planned"] = sum(tag != "other" for _, tag in grid)
    log(f"device {env['device']}; variants {args.variant_names}; backends {order}; dtypes "
        f"{args.dtype_names}; modes {args.mode_names}; batch {args.batch}; "
        f"time limit {args.time_limit_s or 'none'} s"
        + (f"; shard {report['shard']}: {sum(t == 'mine' for _, t in grid)} to measure"
           if args.shard else "") + (f"; merging {len(kept)} rows" if args.merge else ""))
    deadline = Deadline(args.time_limit_s)
    stopped = None
    batches, batches_key = None, None
    for (variant, dtype, mode, backend), tag in grid:
        if tag == "other":
            continue
        if tag == "kept":
            report["rows"].append(kept[(variant, backend, dtype, mode)])
            report["status"]["done"] += 1
            continue
        row = {"variant": variant, "backend": backend, "dtype": dtype, "mode": mode,
               "gmacs": model_gmacs(model_config(variant, args.max_depth), args.image_size,
                                    NUM_CLASSES)}
        if backend == "dense":
            row["impl"] = dense_impl(dtype, args.dense_impl)
        report["rows"].append(row)
        if args.merge:
            row["skipped"] = "not measured in the merged runs"
            continue
        if stopped is None and deadline.passed():
            stopped = "time limit"
        if stopped:
            row["skipped"] = f"not run: {stopped}"
            continue
        per = report["backends"][backend]
        if dtype not in per:
            per[dtype] = probe_backend(backend, dtype, args)
            if per[dtype]:
                log(f"backend {backend} ({dtype}) skipped: {per[dtype]}")
        if per[dtype]:
            row["skipped"] = f"{UNAVAILABLE}: {per[dtype]}"
            continue
        if backend == "reference" and args.reference_max_params_m and \
                _official_params_m(variant) > args.reference_max_params_m:
            row["skipped"] = (f"reference skipped above "
                              f"{args.reference_max_params_m:g}M parameters")
            continue
        t0 = time.perf_counter()
        row["device"] = env["device"]
        try:
            if batches_key != dtype:
                batches, batches_key = None, None
                gc.collect()
                batches, batches_key = make_batches(args.batch, args.image_size, dtype), dtype
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(measure_dense_fallback(variant, backend, dtype, mode,
                                                  batches, args, row))
        except Exception as e:  # noqa: BLE001 - OOM, compile errors: record, go on
            row["error"] = error_text(e)
            if is_fatal(row["error"]):
                stopped = f"device error in {variant} {backend}: {row['error'][:200]}"
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        report["status"]["done"] += 1
        report["status"]["elapsed_s"] = round(deadline.elapsed_s(), 1)
        log(f"{variant} {backend} {dtype} {mode}: "
            + (f"{row['images_per_s']:.1f} img/s ({row['ms']:.2f} ms, compile "
               f"{row['timing']['compile_s']:.1f} s)" if "ms" in row
               else row.get("error", "")[:200]) + f" [{row['wall_s']} s]")
        gc.collect()
        jax.clear_caches()  # bounds host memory of the compiled programs
        write(report, args)
    report["status"]["stopped"] = stopped
    report["status"]["elapsed_s"] = round(deadline.elapsed_s(), 1)
    write(report, args)
    print(markdown(report), flush=True)
    return report


def row_key(r: dict) -> tuple:
    return (r["variant"], r["backend"], r["dtype"], r["mode"])


def plan(args, order, kept) -> list:
    """The grid in run order (variant by variant, smallest first; then dtype, mode, backend),
    each entry ``((variant, dtype, mode, backend), tag)``: "kept" (an earlier run's row),
    "mine" (to measure here) or "other" (another shard's)."""
    out, todo = [], 0
    for variant in args.variant_names:
        for dtype in args.dtype_names:
            for mode in args.mode_names:
                for backend in order:
                    if not wanted(args.only, variant, mode, backend, dtype):
                        continue
                    key = (variant, dtype, mode, backend)
                    if (variant, backend, dtype, mode) in kept:
                        out.append((key, "kept"))
                        continue
                    out.append((key, "mine" if resume.mine(todo, args.shard) else "other"))
                    todo += 1
    return out


def wanted(only, variant: str, mode: str, backend: str, dtype: str) -> bool:
    """Whether --only (parsed entries; empty: everything) names this measurement."""
    short = DTYPE_SHORT.get(dtype, dtype)
    return not only or any(
        o[:2] == (variant, mode) and (len(o) < 3 or o[2] == backend)
        and (len(o) < 4 or o[3] in (dtype, short)) for o in only)


@functools.lru_cache(maxsize=None)
def _official_params_m(variant: str) -> float:
    """Parameters of the official configuration (millions), without building it."""
    from flax import nnx

    from natten_jax.models import count_params, create_model

    return count_params(nnx.eval_shape(lambda: create_model(variant, rngs=nnx.Rngs(0)))) / 1e6


if __name__ == "__main__":
    main()
