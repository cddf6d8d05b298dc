"""tools.finetune_hf's --pooling, --head and --layerwise-lr-decay (tools.finetune_heads): through the command line
on tiny local folders, the exact per-group learning rates, mean pooling under padding, and the head swap of our
own BERT MLM and ELECTRA discriminator exports (tools.convert_to_hf)."""

import json
import os

import pytest

torch = pytest.importorskip("torch")

from tests.test_convert import electra_workdir, small_workdir  # noqa: E402,F401  (fixtures)
from tests.test_finetune import _write_model, _write_task  # noqa: E402
from tests.test_finetune_tasks import _write_keyword_task  # noqa: E402
from tools import convert_to_hf, finetune_hf  # noqa: E402
from tools.finetune_heads import decay_exponent  # noqa: E402

LABELS = ["colour_blue", "colour_red"]


def _main(capsys, *argv):
    assert finetune_hf.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"task": _write_task(root / "task"), "bert": _write_model(root / "bert", "bert"),
            "electra": _write_model(root / "electra", "electra")}


@pytest.mark.parametrize("flags, expect", [
    (["--pooling", "mean"], {"pooling": "mean", "head": "auto"}),
    (["--head", "bert"], {"head": "bert", "pooling": "cls"}),
    (["--head", "electra", "--pooling", "mean"], {"head": "electra", "pooling": "mean"}),
    (["--layerwise-lr-decay", "0.8"], {"layerwise_lr_decay": 0.8, "head": "auto"}),
])
def test_each_option_learns_the_keyword_task_through_the_cli(folders, capsys, flags, expect):
    """The fresh heads train (the keyword decides the label), and the result says which options ran."""
    result = _main(capsys, "--model", folders["bert"], "--task", folders["task"], "--epochs", "8", "--lr", "3e-3",
                   "--batch-size", "8", "--max-len", "16", "--seed", "1", "--dropout", "0", *flags)
    assert {k: result[k] for k in expect} == expect
    assert result["layerwise_lr_decay"] == expect.get("layerwise_lr_decay", 1.0)
    assert result["accuracy"] >= 0.9, result


def test_explicit_default_flags_give_the_same_result(folders, capsys):
    """The defaults build the same model and optimizer: the same figures to the last bit."""
    argv = ["--model", folders["electra"], "--task", folders["task"], "--epochs", "2", "--batch-size", "8",
            "--max-len", "16", "--lr", "1e-3"]
    plain = _main(capsys, *argv)
    explicit = _main(capsys, *argv, "--pooling", "cls", "--head", "auto", "--layerwise-lr-decay", "1")
    plain.pop("train_seconds"), explicit.pop("train_seconds")
    assert plain == explicit
    model = finetune_hf.build_model(folders["electra"], LABELS, random_init=False, dropout=0.1)
    assert type(model).__name__ == "ElectraForSequenceClassification"
    opt, _ = finetune_hf.optimizer_and_schedule(model, 1e-3, 0.01, 10, 0.06)
    assert [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.01), (1e-3, 0.0)]


def test_layerwise_lr_decay_gives_each_depth_its_rate(folders):
    """2 layers, D = 0.5, ELECTRA's depths: head lr, layer 1 lr/4, layer 0 lr/8, embeddings lr/16; no weight
    decay on biases/LayerNorm."""
    for head in ("auto", "bert"):
        model = finetune_hf.build_model(folders["electra"], LABELS, False, 0.1, head=head)
        opt, _ = finetune_hf.optimizer_and_schedule(model, 1e-3, 0.01, 10, 0.06, layer_decay=0.5)
        lr_of = {id(p): (g["initial_lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
        got = {name: lr_of[id(p)] for name, p in model.named_parameters()}
        assert len(got) == len(list(model.parameters()))  # every parameter in one group
        base = "base_model" if head == "bert" else "electra"
        expected = {f"{base}.embeddings.word_embeddings.weight": (6.25e-5, 0.01),
                    f"{base}.embeddings.LayerNorm.weight": (6.25e-5, 0.0),
                    f"{base}.embeddings_project.weight": (6.25e-5, 0.01),
                    f"{base}.encoder.layer.0.attention.self.query.weight": (1.25e-4, 0.01),
                    f"{base}.encoder.layer.0.output.dense.bias": (1.25e-4, 0.0),
                    f"{base}.encoder.layer.1.intermediate.dense.weight": (2.5e-4, 0.01),
                    f"{base}.encoder.layer.1.output.LayerNorm.bias": (2.5e-4, 0.0)}
        expected.update({"head.0.weight": (1e-3, 0.01), "head.3.bias": (1e-3, 0.0)} if head == "bert" else
                        {"classifier.dense.weight": (1e-3, 0.01), "classifier.out_proj.bias": (1e-3, 0.0)})
        assert {k: got[k] for k in expected} == expected
        assert sorted({lr for lr, _ in got.values()}) == [6.25e-5, 1.25e-4, 2.5e-4, 1e-3]


@pytest.mark.parametrize("family", ["bert", "electra", "roberta", "deberta-v2"])
def test_decay_exponent_reads_each_familys_parameter_names(family):
    """L = 2: every parameter of a transformers sequence classifier of the family gets 0 (head), 2 or 3 (its
    layer) or 4 (the rest of the encoder), each layer the same number of tensors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    extra = {}
    if family == "deberta-v2":  # with its relative embeddings
        extra = dict(relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm")
    config = AutoConfig.for_model(family, vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=40, num_labels=3, **extra)
    names = [n for n, _ in AutoModelForSequenceClassification.from_config(config).named_parameters()]
    depth = {n: decay_exponent(n, 2) for n in names}
    by = {d: [n for n in names if depth[n] == d] for d in range(5)}
    assert set(depth.values()) == {0, 2, 3, 4}, depth
    assert all(("classifier" in n or "pooler" in n) for n in by[0]) and any("classifier" in n for n in by[0])
    assert all(".layer.1." in n for n in by[2]) and all(".layer.0." in n for n in by[3])
    assert len(by[2]) == len(by[3])
    assert any("word_embeddings" in n for n in by[4]) and not any(".layer." in n for n in by[4])
    if family == "deberta-v2":  # the relative embeddings, shared by all layers, go with the embeddings
        assert {"deberta.encoder.rel_embeddings.weight", "deberta.encoder.LayerNorm.weight"} <= set(by[4])
    with pytest.raises(ValueError, match="layer 2 of a 2-layer encoder"):
        decay_exponent("bert.encoder.layer.2.output.dense.weight", 2)


def test_mean_pooling_ignores_padding(folders):
    """A prediction does not change when padding is added to its batch (the mean is over the attention mask)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["bert"])
    torch.manual_seed(0)
    model = finetune_hf.build_model(folders["bert"], LABELS, False, 0.1, pooling="mean").eval()
    alone = tokenizer(["red alpha beta"], return_tensors="pt")
    padded = tokenizer(["red alpha beta", "the file list value returns the gamma delta green"], padding=True,
                       return_tensors="pt")
    assert padded["attention_mask"][0].tolist().count(0) >= 5  # the first row is padded
    with torch.no_grad():
        a = model(**alone).logits[0]
        b = model(**padded).logits[0]
    assert torch.allclose(a, b, atol=1e-6), (a, b)
    # Zeroing the mask of the padding is what keeps it out: counted in, the prediction moves.
    with torch.no_grad():
        c = model(**{**padded, "attention_mask": torch.ones_like(padded["attention_mask"])}).logits[0]
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("export, head", [("discriminator", "bert"), ("mlm", "electra")])
def test_head_swap_puts_our_exports_encoder_under_the_other_head(small_workdir, electra_workdir,  # noqa: F811
                                                                  tmp_path, capsys, export, head):
    """tools.convert_to_hf's ELECTRA discriminator under BERT's head and BERT MLM export under ELECTRA's: the
    bare encoder loads every one of its weights from the folder (checked when loading), starts equal to them,
    and fine-tunes through the command line."""
    from safetensors.torch import load_file

    workdir = (electra_workdir if export == "discriminator" else small_workdir)[0]
    folder = str(tmp_path / export)
    convert_to_hf.convert(workdir, folder, model=export)
    model = finetune_hf.build_model(folder, LABELS, False, 0.1, head=head)
    assert type(model.base_model).__name__ == ("ElectraModel" if export == "discriminator" else "BertModel")
    activation = torch.nn.Tanh if head == "bert" else torch.nn.GELU
    assert any(isinstance(m, activation) for m in model.head)
    prefix = "electra." if export == "discriminator" else "bert."
    saved = {k[len(prefix):]: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()
             if k.startswith(prefix)}
    ours = model.base_model.state_dict()
    assert set(ours) - {"embeddings.position_ids", "embeddings.token_type_ids"} <= set(saved)
    for name, tensor in ours.items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    assert sum(name in saved for name in ours) >= 30

    result = _main(capsys, "--model", folder, "--task", _write_task(tmp_path / "task", 16, 8), "--epochs", "1",
                   "--batch-size", "8", "--max-len", "16", "--head", head)
    assert result["head"] == head and result["steps"] == 2 and 0.0 <= result["accuracy"] <= 1.0


def test_token_tasks_take_layerwise_decay_and_refuse_head_and_pooling(tmp_path, capsys):
    from tests.test_finetune_tasks import WORDS, _write_model as write_words_model

    task = _write_keyword_task(tmp_path / "task", "token", n_train=16, n_test=8)
    model = write_words_model(str(tmp_path / "tiny"), WORDS)
    argv = ["--model", model, "--task", task, "--epochs", "1", "--batch-size", "8", "--max-len", "24"]
    result = _main(capsys, *argv, "--layerwise-lr-decay", "0.8")
    assert result["kind"] == "token" and result["layerwise_lr_decay"] == 0.8 and result["steps"] == 2
    for flag, value in (("--head", "bert"), ("--pooling", "mean")):
        with pytest.raises(SystemExit, match=r"^error: .* is a token task: --pooling and --head apply to sequence "
                                             r"tasks only"):
            finetune_hf.main(argv + [flag, value])


@pytest.mark.parametrize("flags, message", [
    (["--layerwise-lr-decay", "0"], r"^error: --layerwise-lr-decay must be in \(0, 1\] \(1: off\), got 0.0$"),
    (["--layerwise-lr-decay", "1.5"], r"^error: --layerwise-lr-decay must be in \(0, 1\] \(1: off\), got 1.5$"),
    (["--head", "bert", "--save", "x"], r"^error: --save writes a transformers class: it takes the default"),
])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path, flags, message):
    # No task and no model exist: the flags are checked first.
    with pytest.raises(SystemExit, match=message):
        finetune_hf.main(["--model", str(tmp_path / "none"), "--task", str(tmp_path / "none"), *flags])
    with pytest.raises(SystemExit):  # argparse names the flag and the choices
        finetune_hf.main(["--model", "m", "--task", "t", "--head", "roberta"])
