"""bert_jax.hf_import (and its CLI tools.import_from_hf) on Hugging Face ELECTRA folders: a random
ElectraForPreTraining (+ ElectraForMaskedLM sharing its embeddings) -> our ElectraForPretraining checkpoint ->
each tower exported back, bitwise; the fresh-generator and fresh-head paths; the one-line refusals."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from bert_jax import hf_import  # noqa: E402
from bert_jax.checkpointing import load_params  # noqa: E402
from bert_jax.hf_export import ConversionError  # noqa: E402
from bert_jax.models import hf_mapping  # noqa: E402
from tools import convert_to_hf, import_from_hf  # noqa: E402

# ~25 s on 2 CPU cores (two torch models, three imports, four verified exports).
pytestmark = pytest.mark.slow

# A hand-written vocabulary: 5 specials + ~100 distinct lowercase words.
WORDS = """the a an and or but if of to in on at by for with from up down over under is are was were be been
have has had do does did say said go went make made take took see saw come came know knew think get give find
tell ask work seem feel try leave call good new first last long great little own other old right big high small
large next early young important few public bad same able cat dog bird fish tree house car road city river
sea sun moon star day night time year way man""".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
assert len(set(VOCAB)) == len(VOCAB)


def _config(hidden: int, heads: int, intermediate: int, architecture: str, hidden_act: str = "gelu"):
    return transformers.ElectraConfig(
        vocab_size=len(VOCAB), embedding_size=32, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
        hidden_act=hidden_act, architectures=[architecture])


def _perturb(model, dense_noise: float = 0.05):
    # Fresh HF LayerNorms are 1/0 and biases 0: noise makes every tensor carry information to lose.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (dense_noise if "dense.weight" in name else 0.05))


def _save(model, folder):
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB))
    return str(folder)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(discriminator folder, generator folder): the generator's embeddings are the discriminator's."""
    return _make_pair(tmp_path_factory.mktemp("hf_electra"))


def _make_pair(root, hidden_act: str = "gelu", dense_noise: float = 0.05):
    torch.manual_seed(0)
    disc = transformers.ElectraForPreTraining(_config(64, 4, 128, "ElectraForPreTraining", hidden_act))
    gen = transformers.ElectraForMaskedLM(_config(32, 2, 64, "ElectraForMaskedLM", hidden_act))
    _perturb(disc, dense_noise)
    _perturb(gen, dense_noise)
    shared = {k: v for k, v in disc.state_dict().items() if k.startswith("electra.embeddings.")}
    gen.load_state_dict({**gen.state_dict(), **shared})
    return _save(disc, root / "disc"), _save(gen, root / "gen")


@pytest.fixture(scope="module")
def imported(hf_pair, tmp_path_factory):
    disc_dir, gen_dir = hf_pair
    workdir = str(tmp_path_factory.mktemp("w"))
    summary = hf_import.import_hf(disc_dir, workdir, generator_dir=gen_dir)
    return workdir, summary


def _expected(folder: str, model: str) -> dict:
    """The folder's tensors minus the ones with no place of their own in our tree (buffers, tied copies)."""
    tensors = load_file(f"{folder}/model.safetensors")
    skipped = set(hf_mapping.unused_names(tensors, model))
    return {k: v for k, v in tensors.items() if k not in skipped}


def _assert_bitwise(exported: str, original: dict):
    back = load_file(f"{exported}/model.safetensors")
    assert set(back) == set(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


@pytest.mark.parametrize("model", ["discriminator", "generator"])
def test_round_trip_bitwise(hf_pair, imported, tmp_path, model):
    workdir, summary = imported
    assert not summary["discriminator_head_initialised"] and not summary["generator_initialised"]
    out = str(tmp_path / model)
    result = convert_to_hf.convert(workdir, out, model=model, verify=True)
    assert result["ok"]
    _assert_bitwise(out, _expected(hf_pair[model == "generator"], model))


def test_tanh_gelu_towers_verify(tmp_path):
    """Towers with GELU's tanh approximation (gelu_new): the layers and the discriminator head compute the tanh
    form, the generator head the exact one (transformers' ElectraGeneratorPredictions ignores hidden_act);
    both exports match torch, with MLP/head pre-activations large enough for the two forms to differ."""
    disc_dir, gen_dir = _make_pair(tmp_path, hidden_act="gelu_new", dense_noise=0.3)
    workdir = str(tmp_path / "w")
    hf_import.import_hf(disc_dir, workdir, generator_dir=gen_dir)
    _, meta = load_params(workdir)
    assert meta.model.hidden_act == meta.generator.hidden_act == "gelu_tanh"
    for model in ("discriminator", "generator"):
        out = tmp_path / model
        result = convert_to_hf.convert(workdir, str(out), model=model, verify=True)
        assert result["ok"], (model, result)
        assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"


def test_checkpoint_reads_back(hf_pair, imported):
    workdir, _ = imported
    params, meta = load_params(workdir)
    assert set(params) == {"embeddings", "generator", "discriminator"}
    assert meta.objective == "electra" and meta.step == 0
    assert meta.model.hidden_size == 64 and meta.model.embedding_size == 32
    assert meta.generator.hidden_size == 32 and meta.generator.num_heads == 2
    assert meta.imported_from == {"hf": hf_pair[0], "generator": hf_pair[1], "initialised": []}
    assert meta.vocab_hash and meta.data is None
    assert "embeddings_project" in params["discriminator"] and "embeddings_project" not in params["generator"]
    with open(f"{workdir}/tokenizer/vocab.txt", encoding="utf-8") as f:
        assert f.read().split() == VOCAB


def test_untied_embeddings_refused(hf_pair, tmp_path):
    disc_dir, gen_dir = hf_pair
    tensors = load_file(f"{gen_dir}/model.safetensors")
    tensors["electra.embeddings.position_embeddings.weight"] += 1
    other = tmp_path / "gen"
    other.mkdir()
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    (other / "config.json").write_text(open(f"{gen_dir}/config.json", encoding="utf-8").read())
    with pytest.raises(ConversionError,
                       match=r"embeddings differ from the discriminator's \(embeddings/position\)"):
        hf_import.import_hf(disc_dir, str(tmp_path / "w"), generator_dir=str(other))
    assert not (tmp_path / "w" / "checkpoints").exists() or not list((tmp_path / "w" / "checkpoints").iterdir())


def test_fresh_generator(hf_pair, tmp_path, capsys):
    disc_dir, _ = hf_pair
    workdir = str(tmp_path / "w")
    summary = hf_import.import_hf(disc_dir, workdir, generator_fraction=0.5)
    assert summary["generator_initialised"] and "starts freshly initialised" in capsys.readouterr().out
    _, meta = load_params(workdir)
    assert meta.generator.hidden_size == 32 and meta.generator.embedding_size == 32
    assert meta.imported_from["generator"] is None and meta.imported_from["initialised"] == ["generator"]
    convert_to_hf.convert(workdir, str(tmp_path / "d"), model="discriminator")
    _assert_bitwise(str(tmp_path / "d"), _expected(disc_dir, "discriminator"))
    assert convert_to_hf.convert(workdir, str(tmp_path / "g"), model="generator", verify=True)["ok"]


def test_bare_electra_model_gets_fresh_head(hf_pair, tmp_path, capsys):
    """An ElectraModel writes bare names (`embeddings.*`, `encoder.*`) and no discriminator head."""
    disc_dir, _ = hf_pair
    tensors = load_file(f"{disc_dir}/model.safetensors")
    bare = {k.removeprefix("electra."): v for k, v in tensors.items() if k.startswith("electra.")}
    src = tmp_path / "bare"
    src.mkdir()
    save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(open(f"{disc_dir}/config.json", encoding="utf-8").read())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["ElectraModel"]}))
    summary = hf_import.import_hf(str(src), str(tmp_path / "w"))
    assert summary["discriminator_head_initialised"] and "no discriminator head" in capsys.readouterr().out
    params, meta = load_params(str(tmp_path / "w"))
    assert meta.imported_from["initialised"] == ["discriminator_head", "generator"]
    assert params["discriminator"]["head"]["dense"]["kernel"].shape == (64, 64)


def test_refusals(hf_pair, tmp_path):
    disc_dir, gen_dir = hf_pair
    with pytest.raises(ConversionError, match="is an ElectraForMaskedLM"):
        hf_import.import_hf(gen_dir, str(tmp_path / "w"))
    with pytest.raises(ConversionError, match=r"generator_fraction=0 must lie in"):
        hf_import.import_hf(disc_dir, str(tmp_path / "w"), generator_fraction=0)
    config = json.loads(open(f"{disc_dir}/config.json", encoding="utf-8").read())
    # Outside the ELECTRA path the BERT importer still refuses model_type electra.
    with pytest.raises(ValueError, match=r"model_type='electra' \(only 'bert'\)"):
        hf_mapping.encoder_config_kwargs(config)
    with pytest.raises(ValueError, match="relative_key"):
        hf_mapping.encoder_config_kwargs({**config, "position_embedding_type": "relative_key"}, ("electra",))
    relative = tmp_path / "rel"
    relative.mkdir()
    (relative / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConversionError, match="cannot import this model: hidden_act='relu'"):
        hf_import.import_hf(str(relative), str(tmp_path / "w"))
    with pytest.raises(SystemExit) as e:  # the CLI: one line
        import_from_hf.main(["--hf", str(relative), "--out", str(tmp_path / "w")])
    assert e.value.code.startswith("error: ") and "cannot import this model: hidden_act='relu'" in e.value.code


def test_cli(hf_pair, tmp_path, capsys):
    disc_dir, gen_dir = hf_pair
    assert import_from_hf.main(["--hf", disc_dir, "--generator", gen_dir, "--out", str(tmp_path / "w")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["objective"] == "electra" and summary["step"] == 0
