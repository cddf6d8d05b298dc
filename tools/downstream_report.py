"""The page `tools.downstream` writes (docs/RESULTS.md): the table over seeds, the pretraining eval curves and
their plot, and the protocol's description; plus the table of models and the epochs rule both modules use."""

import json
import math
import os

import numpy as np

from bert_jax import workdir as workdir_lib
from configs import common
from tools import finetune_hf

MODELS = (("scratch", "(a) random init (BERT shape, our tokenizer)"), ("mlm", "(b) MLM-pretrained (ours)"),
          ("electra", "(c) ELECTRA discriminator (ours)"), ("minilm", "(d) all-MiniLM-L6-v2 (reference)"),
          ("dapt", "(e) all-MiniLM-L6-v2 + DAPT on the docstrings (our MLM run's FLOPs)"))
# The rows of `--deberta`: configs/deberta.py:tiny pretrained at the MLM run's FLOPs with each objective.
DEBERTA_MODELS = (("deberta_rtd", "(f) DeBERTa-v3 RTD discriminator (ours, tiny)"),
                  ("deberta_mlm", "(g) DeBERTa MLM (ours, tiny)"))
# The controls, fine-tuned with the few labels and every seed: (row, model, tools.finetune_hf options). The head
# swap puts each encoder under the other family's head and, to compare like with like, under its own (both
# fresh, on the bare encoder: the default head of an ELECTRA folder is ELECTRA's, of a BERT folder BERT's).
CONTROLS = (("mlm+mean", "mlm", {"pooling": "mean"}), ("electra+mean", "electra", {"pooling": "mean"}),
            ("mlm+llrd", "mlm", {"layerwise_lr_decay": 0.8}), ("electra+llrd", "electra", {"layerwise_lr_decay": 0.8}),
            ("mlm@bert_head", "mlm", {"head": "bert"}), ("mlm@electra_head", "mlm", {"head": "electra"}),
            ("electra@bert_head", "electra", {"head": "bert"}),
            ("electra@electra_head", "electra", {"head": "electra"}))
# tools.finetune_hf's defaults of the options (results written before they existed lack them)
DEFAULT_OPTIONS = {"pooling": "cls", "head": "auto", "layerwise_lr_decay": 1.0}


def row_model(name: str) -> tuple[str, dict]:
    """(the model a row fine-tunes, its finetune_hf options)."""
    for row, model, options in CONTROLS:
        if row == name:
            return model, options
    return name, {}


def run_options(result: dict) -> tuple:
    """The (pooling, head, layerwise_lr_decay) a fine-tune ran with."""
    return tuple(result.get(k, v) for k, v in DEFAULT_OPTIONS.items())

# all-MiniLM-L6-v2 with all labels (test accuracy, macro-F1 in %; mean of 3 seeds), from docs/RESULTS.md's run of
# 2026-12-04 with the same settings: quoted on the page when --ref-all-seeds 0 (the default) leaves those
# ~25-min runs out.
EARLIER_REF_ALL = (76.2, 75.6)

def epochs(budget: dict, num_train: int) -> int:
    """Epochs of a fine-tune on `num_train` examples (finetune_hf's default batch of 16)."""
    return finetune_hf.num_epochs(num_train, 16, budget["epochs"], budget["min_steps"])


def eval_records(workdir: str) -> list[dict]:
    """The eval records (those with `eval/loss`) of a run's metrics.jsonl, in order; [] when it has none yet."""
    path = workdir_lib.metrics(workdir)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "eval/loss" in r]


def eval_curves(out: str, names) -> dict:
    """name -> the eval records of OUT/pretrain_NAME."""
    return {name: eval_records(os.path.join(out, f"pretrain_{name}")) for name in names}



def summarise(results: list[dict]) -> dict:
    table = {}
    for name in [n for n, _ in MODELS + DEBERTA_MODELS] + [n for n, _, _ in CONTROLS]:
        for labels in ("few", "all"):
            rs = [r for r in results if r["name"] == name and r["labels"] == labels]
            if not rs:
                continue
            acc = np.array([r["accuracy"] for r in rs]) * 100
            f1 = np.array([r["macro_f1"] for r in rs]) * 100
            table[f"{name}/{labels}"] = {
                "num_train": rs[0]["num_train"], "seeds": len(rs),
                "accuracy": round(float(acc.mean()), 2), "accuracy_std": round(float(acc.std()), 2),
                "macro_f1": round(float(f1.mean()), 2), "macro_f1_std": round(float(f1.std()), 2),
                "finetune_seconds": round(float(np.mean([r["train_seconds"] for r in rs])), 1)}
    return table


def plot_curves(curves: dict, info: dict, png: str) -> bool:
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))

    def tflop(name):
        return [r["step"] * info[name]["step_flops"] / 1e12 for r in curves[name]]

    for name, key, label in (("mlm", "eval/mlm_accuracy", "MLM"),
                             ("electra", "eval/gen_mlm_accuracy", "ELECTRA generator"),
                             ("deberta_mlm", "eval/mlm_accuracy", "DeBERTa MLM"),
                             ("deberta_rtd", "eval/gen_mlm_accuracy", "DeBERTa-v3 RTD generator")):
        if name in curves:
            ax1.plot(tflop(name), [r.get(key, np.nan) for r in curves[name]], "o-", label=label)
    for name, style, label in (("electra", "o-", "ELECTRA"), ("deberta_rtd", "s--", "DeBERTa-v3 RTD")):
        if name not in curves:
            continue
        for color, key in zip(("C0", "C1", "C2"), ("disc_accuracy", "disc_precision", "disc_recall")):
            ax2.plot(tflop(name), [r.get(f"eval/{key}", np.nan) for r in curves[name]], style, color=color,
                     label=f"{label} {key.replace('_', ' ')}")
    for ax, title in ((ax1, "held-out masked-token accuracy (validation split)"),
                      (ax2, "discriminators (validation split)")):
        ax.set_xlabel("pretraining compute (TFLOP, bert_jax.flops)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def optim_note(info: dict) -> str:
    """The pretraining optimizer both runs used (the recipes' shared one, or the sweep's lr and b2)."""
    o = info["mlm"]["overrides"]
    lr = o.get("optim.learning_rate", common.TINY_OPTIM["learning_rate"])
    b2 = o.get("optim.b2", common.TINY_OPTIM["b2"])
    source = "chosen by the sweep below" if "optim.learning_rate" in o else "`configs/common.py` TINY_OPTIM"
    return (f"AdamW, lr {lr:g}, b2 {b2:g} ({source}), eps {common.TINY_OPTIM['eps']:g}, weight decay "
            f"{common.TINY_OPTIM['weight_decay']:g}, linear warmup over 1/12 of the steps then linear decay")


def _cell(t: dict | None, budget: dict) -> list[str]:
    """Accuracy and macro-F1 cells of a table entry: mean ± std, with n where fewer seeds ran."""
    if t is None:
        return ["", ""]
    n = f" (n={t['seeds']})" if t["seeds"] != budget["seeds"] else ""
    return [f"{t['accuracy']:.1f} ± {t['accuracy_std']:.1f}{n}", f"{t['macro_f1']:.1f} ± {t['macro_f1_std']:.1f}"]


def controls_table(table: dict, budget: dict) -> list[str]:
    """The controls at the few labels, each beside its model's plain row (a pointer to `--controls` if none ran)."""
    if not any(f"{row}/few" in table for row, _, _ in CONTROLS):
        return ["## Controls (fine-tuning choices)", "",
                f"Not run by this invocation: `--controls` adds them ({len(CONTROLS)} fine-tunes with "
                f"{budget['few']} labels per seed; finished runs are reused).", ""]
    lines = ["## Controls (fine-tuning choices)", "",
             f"{budget['few']} labels, every seed, the settings above but for one option of `tools.finetune_hf`: "
             "`--pooling mean` (the head reads the masked mean of the final hidden states, not [CLS]), "
             "`--layerwise-lr-decay 0.8` (ELECTRA's rule: the head at lr, layer k of L at lr x 0.8^(L+1-k), the "
             "embeddings at lr x 0.8^(L+2)), `--head bert|electra` (a fresh head of BERT's shape: dense + tanh, "
             "dropout, linear; or of ELECTRA's: dropout, dense, GELU, dropout, linear; on the bare encoder). "
             "The head swap (`mlm@electra_head`, `electra@bert_head`) is compared with the same encoders under "
             "their own family's head, built the same way (`mlm@bert_head`, `electra@electra_head`).", "",
             "| row | model | option | acc | macro-F1 |", "|---|---|---|---|---|"]
    for name, _ in MODELS:
        rows = [(name, name, "(the table above)")] + [
            (row, model, " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()))
            for row, model, options in CONTROLS if model == name]
        if len(rows) == 1:
            continue
        for row, model, option in rows:
            lines.append(f"| {row} | {model} | {option} | " + " | ".join(_cell(table.get(f"{row}/few"), budget))
                         + " |")
    return lines + [""]


def sweep_table(sweep: dict | None) -> list[str]:
    """The lr x b2 sweep (`--sweep`, OUT/sweep.json): every run's final held-out loss and the choice."""
    if not sweep:
        return []
    lines = ["### The optimizer sweep (`--sweep`)", "",
             f"Each objective pretrained at {sweep['fraction']:g} of the budget (MLM {sweep['steps']['mlm']} steps, "
             f"ELECTRA {sweep['steps']['electra']}: equal FLOPs) for each lr x b2; the final held-out `eval/loss` "
             "(ELECTRA's: generator MLM + 50 x discriminator), and each setting's score, the mean over the two "
             "objectives of loss / that objective's best. The lowest score is the setting of both runs above.", "",
             "| lr | b2 | MLM loss | ELECTRA loss | score |", "|---|---|---|---|---|"]
    for score in sweep["scores"]:
        loss = {r["objective"]: r["eval_loss"] for r in sweep["runs"]
                if (r["lr"], r["b2"]) == (score["lr"], score["b2"])}
        chosen = (score["lr"], score["b2"]) == (sweep["choice"]["lr"], sweep["choice"]["b2"])
        mark = "**" if chosen else ""
        lines.append(f"| {mark}{score['lr']:g}{mark} | {mark}{score['b2']:g}{mark} | {loss['mlm']:.4f} | "
                     f"{loss['electra']:.4f} | {score['score']:.4f}{' (chosen)' if chosen else ''} |")
    return lines + [""]


def deberta_note(info: dict) -> list[str]:
    if "deberta_rtd" not in info:
        return []
    return ["", "`--deberta` (rows f, g): configs/deberta.py:tiny (2 layers, hidden 128, DeBERTa's disentangled "
            "attention, no absolute positions) pretrained with DeBERTa-v3's replaced-token detection "
            "(`deberta_rtd`: a generator as wide and half as deep, gradient-disentangled embedding sharing; "
            "sampling temperature 1) and with MLM (`--config.objective.name=mlm`), each for the MLM run's "
            "training FLOPs with the shared optimizer, exported by `tools.convert_to_hf` "
            "(`--model deberta_discriminator` / `deberta_mlm`) and fine-tuned as ours."]


def dapt_note(info: dict) -> list[str]:
    if "dapt" not in info:
        return []
    i, o = info["dapt"], info["dapt"]["overrides"]
    return [f"DAPT (row e; the README's \"Continue pretraining a released model on your domain\"): "
            "all-MiniLM-L6-v2 imported (`tools.import_from_hf`), the same corpus pretokenized with its own "
            f"tokenizer (rows of {o['data.seq_len']}), MLM continued from it (`init_from`, its 6 x 384 shape; its "
            f"MLM head starts fresh) for {i['steps']} step(s) of batch {o['train.batch_size']}, the training "
            f"FLOPs of our MLM run, at lr {o['optim.learning_rate']:g} with {o['optim.warmup_steps']} warmup step(s) "
            "(10%) then linear decay, exported (`tools.convert_to_hf --model mlm`)."]


def ref_all_note(budget: dict) -> str:
    n, seeds = budget["ref_all_seeds"], budget["seeds"]
    if n:
        others = "like the other rows" if n == seeds else f"(the other rows: {seeds})"
        return (f"all-MiniLM-L6-v2 and its DAPT continuation with all labels run {n} seed(s) {others}: "
                "`--ref-all-seeds`, since each is ~20x the compute of our models (about 25 min per seed on this "
                "2-core CPU).")
    return ("all-MiniLM-L6-v2 and its DAPT continuation with all labels are not run by default (~20x the compute "
            "of our models: about 25 min per seed on this 2-core CPU): *the reference's figure comes from an "
            "earlier run (docs/RESULTS.md's of 2026-12-04, "
            "mean of 3 seeds, the same settings); `python -m tools.downstream --out runs/downstream "
            "--ref-all-seeds 3` runs it.")


def _fmt(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def write_results(path: str, command: str, quick: bool, budget: dict, task: dict, manifest, info: dict,
                  curves: dict, table: dict, sweep: dict | None, results: list[dict], total_seconds: float) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    png = os.path.splitext(path)[0].replace("RESULTS", "pretraining_curves") + ".png"
    if png == path or not png.endswith(".png"):
        png = os.path.join(os.path.dirname(path), "pretraining_curves.png")
    has_png = plot_curves(curves, info, png)
    lines = ["# Downstream results: what pretraining buys", ""]
    if quick:
        lines += [f"**QUICK MODE: this page was written by `{command}` (a smoke test of every step: tiny "
                  "budgets, one seed; its numbers mean nothing).** The experiment is the command below.", ""]
    lines += ["Reproduce (2-core CPU, no download; finished steps are reused when run again):", "", "```",
              "python -m tools.downstream --out runs/downstream    # the default protocol (under an hour)",
              "python -m tools.downstream --out runs/downstream --controls --deberta --sweep   # + every other table",
              "```", "",
              f"This page: `{command}`, {total_seconds / 60:.1f} min wall-clock for the invocation (steps "
              "finished by an earlier invocation are reused, not counted).", "",
              "## Task", "",
              f"`docstring_origin` (`python -m data_pipeline.tasks docstring_origin --out DIR`): which package a "
              f"docstring comes from, {len(task['labels'])} labels ({', '.join(task['labels'])}); "
              f"{task['examples']['train']} train / {task['examples']['validation']} validation / "
              f"{task['examples']['test']} test documents, split by a hash of the text, at most 1,000 per package. "
              "These documents are removed from the pretraining corpus.", "",
              "## Pretraining (equal training FLOPs)", "",
              f"Corpus: the `docstrings` source minus the task: {manifest.splits['train'].documents:,} "
              f"train documents ({manifest.splits['train'].tokens:,} tokens), WordPiece "
              f"{manifest.vocab_size}, rows of {manifest.seq_len}.", "",
              "| run | recipe | steps | batch | train FLOPs | wall-clock |", "|---|---|---|---|---|---|"]
    for name, i in info.items():
        init = " from all-MiniLM-L6-v2 (init_from)" if i["overrides"].get("init_from") else ""
        lines.append(f"| {name} | `{i['config']}`{init} | {i['steps']} | {i['overrides']['train.batch_size']} | "
                     f"{i['train_flops'] / 1e12:.2f} TFLOP | {i['wall_seconds']:.0f} s |")
    lines += ["", "Both encoders have the same shape (2 layers, hidden 128, 2 heads, MLP 512; ELECTRA's embedding "
              "width is set to 128 and its generator is half as wide; the tiny ELECTRA recipe samples the "
              "replacements at temperature 1, the paper's). Both runs share one optimizer: "
              f"{optim_note(info)}. Steps follow from equal FLOPs by "
              "`bert_jax.flops.train_step_flops` (which is robust to machine load); wall-clock is reported "
              "for information.", "", *dapt_note(info), *deberta_note(info), "", *sweep_table(sweep),
              "## Fine-tuning", "",
              f"`python -m tools.finetune_hf`: whole network, AdamW (weight decay 0.01), 6% warmup then linear "
              f"decay, {budget['epochs']} epochs (more when that is fewer than {budget['min_steps']} steps: "
              f"{epochs(budget, budget['few'])} epochs with {budget['few']} labels, since 3 epochs of a few hundred "
              "examples leave the models far from fitted; see `tools/finetune_hf.py`), batch 16, dropout 0.1, "
              f"max_len {budget['max_len']}; "
              f"lr {budget['lr_ours']:g} for our 2-layer models (as ELECTRA-Small's fine-tuning lr: 5e-5 is too "
              f"low for so small a model in so few steps) and {budget['lr_ref']:g} for all-MiniLM-L6-v2 and its "
              "DAPT continuation. "
              f"Seeds change the label subset, the classifier's initialisation and the batch order. "
              + ref_all_note(budget), "",
              "Test accuracy / macro-F1 in %, mean ± std over seeds:", "",
              f"| model | {budget['few']} labels: acc | macro-F1 | all labels: acc | macro-F1 |",
              "|---|---|---|---|---|"]
    for name, title in MODELS + tuple(m for m in DEBERTA_MODELS if f"{m[0]}/few" in table):
        cells = []
        for labels in ("few", "all"):
            t = table.get(f"{name}/{labels}")
            if t is None and (name, labels, budget["ref_all_seeds"]) == ("minilm", "all", 0):
                cells += [f"{EARLIER_REF_ALL[0]:.1f} (earlier run*)", f"{EARLIER_REF_ALL[1]:.1f}"]
                continue
            cells += _cell(t, budget)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    num_all = table.get("mlm/all", {}).get("num_train")
    lines += ["", f"(all labels = {num_all} training documents; chance = {100 / len(task['labels']):.0f}%.)", ""]
    lines += controls_table(table, budget)
    lines += ["## Pretraining eval curves (validation split, fixed masks)", ""]
    if has_png:
        lines += [f"![pretraining curves]({os.path.basename(png)})", ""]
    lines += ["| run | step | TFLOP | eval loss | MLM acc | disc acc | disc precision | disc recall |",
              "|---|---|---|---|---|---|---|---|"]
    for name in curves:
        for r in curves[name]:
            acc = r.get("eval/mlm_accuracy", r.get("eval/gen_mlm_accuracy"))
            lines.append(f"| {name} | {r['step']} | {r['step'] * info[name]['step_flops'] / 1e12:.2f} | "
                         f"{_fmt(r.get('eval/loss'))} | {_fmt(acc)} | {_fmt(r.get('eval/disc_accuracy'))} | "
                         f"{_fmt(r.get('eval/disc_precision'))} | {_fmt(r.get('eval/disc_recall'))} |")
    lines += ["", "(For ELECTRA and DeBERTa-v3 RTD the MLM accuracy is the generator's; DAPT's is on "
              "all-MiniLM-L6-v2's vocabulary, not comparable with ours.)", "",
              f"Time: pretraining {sum(i['wall_seconds'] for i in info.values()) / 60:.1f} min "
              f"({', '.join(k + ' ' + format(v['wall_seconds'] / 60, '.1f') for k, v in info.items())}), fine-tuning "
              f"{sum(r['train_seconds'] for r in results) / 60:.1f} min ({len(results)} runs, training loops "
              f"only); this invocation {total_seconds / 60:.1f} min wall-clock (finished steps are reused, so a "
              "resumed invocation is shorter than the whole).", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
