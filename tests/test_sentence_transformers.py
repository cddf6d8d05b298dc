"""tools.convert_to_hf --sentence-transformers: a checkpoint of ours exported as a sentence-transformers folder
(bare BertModel / ElectraModel, mean pooling, our head beside it), which SentenceTransformer loads offline without
a warning and whose embeddings are our mean-pooled last hidden states; the plain export of the same workdir is
unchanged."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

from safetensors.numpy import load_file  # noqa: E402

from bert_jax import hf_export, hf_extras  # noqa: E402
from bert_jax.models import hf_mapping  # noqa: E402
from tests.test_convert import electra_workdir, load_sentence_transformer, minilm, small_workdir  # noqa: E402,F401
from tools import convert_to_hf  # noqa: E402

ST_FILES = ["modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json"]


def _texts():
    """Real sentences of varied lengths (3 to ~60 tokens, some truncated at 64) in one batch."""
    return ["Return the sum.", *convert_to_hf.sample_texts(),
            "Open the file and return a stream; raise OSError upon failure."]


def _ours(source, model, texts):
    """Our encoder's last hidden states, mean-pooled over the real tokens, on the exported tokenizer's ids."""
    tok = transformers.AutoTokenizer.from_pretrained(model)
    batch = tok(texts, padding=True, truncation=True, max_length=source.config.max_position_embeddings,
                return_tensors="np")
    hidden, _ = hf_export.run_model(source.config, source.params, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"], source.model)
    mask = batch["attention_mask"][..., None].astype(np.float64)
    return ((hidden * mask).sum(1) / mask.sum(1)).astype(np.float32)


def _check_loads_and_embeds(out, workdir, model_kind):
    st, logged = load_sentence_transformer(out)
    assert not logged, logged  # no load report (UNEXPECTED / MISSING), no "No sentence-transformers model found"
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"]
    pooling = st[1].get_config_dict()
    assert pooling.get("pooling_mode", "mean" if pooling.get("pooling_mode_mean_tokens") else None) == "mean"
    source = hf_export.load(workdir, model_kind)
    texts = _texts()
    theirs = st.encode(texts, batch_size=3)  # batches of different padding
    ours = _ours(source, out, texts)
    rel = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    print(f"{model_kind}: SentenceTransformer vs our mean-pooled hidden states: max rel diff {rel:.3g}")
    assert rel <= 1e-5
    return source


def test_cli_exports_ours_as_sentence_transformers(small_workdir, tmp_path, capsys):  # noqa: F811
    workdir, cfg, params = small_workdir
    out = str(tmp_path / "st")
    assert convert_to_hf.main(["--workdir", workdir, "--out", out, "--sentence-transformers", "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["st_ok"] and summary["st_max_rel_diff_embedding"] <= 1e-5
    assert summary["st_modules"] == ["Transformer", "Pooling"]
    assert summary["architectures"] == ["BertModel"] and summary["head_file"] == "mlm_head.safetensors"
    assert summary["sentence_transformers_files"] == ST_FILES
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", "mlm_head.safetensors",
                                              *hf_export.TOKENIZER_FILES, "modules.json", "1_Pooling",
                                              "sentence_bert_config.json", "config_sentence_transformers.json"])
    pooling = json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == cfg.hidden_size
    assert json.loads((tmp_path / "st" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64

    # Bare BertModel names, nothing trained lost: the head lies beside it.
    tensors, head = (load_file(os.path.join(out, f)) for f in ("model.safetensors", "mlm_head.safetensors"))
    ours = hf_mapping.to_hf(params, cfg)
    assert set(head) == hf_mapping.head_names("mlm")
    assert {f"bert.{k}" for k in tensors} | set(head) == set(ours)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, ours[f"bert.{name}"])
    _check_loads_and_embeds(out, workdir, "mlm")


def test_plain_export_of_the_same_workdir_unchanged(small_workdir, tmp_path):  # noqa: F811
    workdir, cfg, params = small_workdir
    out = str(tmp_path / "mlm")
    summary = convert_to_hf.convert(workdir, out, verify=True)
    assert summary["ok"] and summary["architectures"] == ["BertForMaskedLM"] and summary["head_file"] is None
    assert summary["sentence_transformers_files"] == [] and "st_ok" not in summary
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *hf_export.TOKENIZER_FILES])
    assert set(load_file(os.path.join(out, "model.safetensors"))) == set(hf_mapping.to_hf(params, cfg))


@pytest.mark.parametrize("model", ["discriminator", "generator"])
def test_electra_tower_as_sentence_transformers(electra_workdir, tmp_path, model):  # noqa: F811
    """The same code for ELECTRA's towers: a bare ElectraModel (the discriminator's embeddings_project
    included), the tower's head beside it."""
    workdir = electra_workdir[0]
    out = str(tmp_path / model)
    summary = convert_to_hf.convert(workdir, out, model=model, verify=True, sentence_transformers=True)
    assert summary["ok"] and summary["st_max_rel_diff_embedding"] <= 1e-5
    assert summary["architectures"] == ["ElectraModel"] and summary["head_file"] == f"{model}_head.safetensors"
    assert set(load_file(os.path.join(out, summary["head_file"]))) == hf_mapping.head_names(model)
    projected = "embeddings_project.weight" in load_file(os.path.join(out, "model.safetensors"))
    assert projected == (model == "discriminator")
    _check_loads_and_embeds(out, workdir, model)


def test_verify_fails_in_one_line_over_tolerance(small_workdir, tmp_path, monkeypatch, capsys):  # noqa: F811
    workdir = small_workdir[0]
    monkeypatch.setattr(convert_to_hf, "mean_pool", lambda h, m: h[:, 0])  # [CLS], not the mean
    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(["--workdir", workdir, "--out", str(tmp_path / "o"), "--sentence-transformers",
                            "--verify"])
    assert str(e.value.code).startswith("error: verification failed: SentenceTransformer embeddings differ")
    assert "\n" not in str(e.value.code)


def test_imported_sentence_transformers_extras_are_kept():
    """A workdir that already holds a sentence-transformers folder's files keeps its own modules."""
    kept = hf_extras.Extras(directory="d", tensors={}, config={"architectures": ["BertModel"]},
                            files=("modules.json",))
    assert hf_extras.with_sentence_transformers(kept, "mlm", 64, 64) is kept
    other = hf_extras.Extras(directory="d", tensors={}, config={"architectures": ["BertForMaskedLM"], "x": 1},
                             files=())
    made = hf_extras.with_sentence_transformers(other, "mlm", 64, 64)
    assert made.config == {"architectures": ["BertModel"], "x": 1} and hf_extras.base_layout(made, "mlm")


@pytest.mark.slow
def test_imported_sentence_transformers_folder_keeps_its_modules(minilm, tmp_path):  # noqa: F811
    """all-MiniLM-L6-v2 imported: --sentence-transformers writes what the plain export writes (its own modules,
    Normalize included, its pooler), and --verify compares its normalised mean pooling with ours."""
    _, workdir, _ = minilm
    plain = convert_to_hf.convert(workdir, str(tmp_path / "plain"))
    summary = convert_to_hf.convert(workdir, str(tmp_path / "st"), verify=True, sentence_transformers=True)
    assert summary["ok"] and summary["st_modules"] == ["Transformer", "Pooling", "Normalize"]
    assert summary["st_max_rel_diff_embedding"] <= 1e-5
    assert summary["sentence_transformers_files"] == plain["sentence_transformers_files"]
    assert sorted(os.listdir(tmp_path / "st")) == sorted(os.listdir(tmp_path / "plain"))


@pytest.mark.slow
def test_readme_sentence_transformers_section_runs(small_workdir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """README's "Sentence embeddings with sentence-transformers", as written: its command on a tiny workdir at
    runs/tiny, then its Python snippet in a fresh interpreter."""
    import shutil  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    from tests.helpers import readme_commands, readme_python  # pylint: disable=import-outside-toplevel

    heading = "### Sentence embeddings with sentence-transformers"
    commands = readme_commands(heading)
    assert [m for m, _ in commands] == ["tools.convert_to_hf"]
    shutil.copytree(small_workdir[0], tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert convert_to_hf.main(commands[0][1]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["ok"] and figures["st_ok"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", readme_python(heading)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1"}, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("(3, 64) tensor([[")
