"""docs/TPU.md's commands cannot drift from the code: every `python -m MODULE ...` line of its bash blocks is
parsed by that module's own parser (absl flags plus the config file and its keys for training and planning,
argparse for the others, Beam's pipeline options for pretokenize's Dataflow flags). gcloud is not run."""

import os
import re
import shlex
import subprocess
import sys

from data_pipeline import pretokenize, validate
from tools import convert_to_hf, inspect_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = {"BUCKET": "bert-jax-test", "PROJECT": "test", "NAME": "bert-v4-32", "ZONE": "us-central2-b"}
ABSL = {"bert_jax.training": "from bert_jax.training import parse_flags as parse",
        "tools.plan": "from tools.plan import _parse_flags as parse"}
ARGPARSE = {"data_pipeline.pretokenize": pretokenize._parser, "data_pipeline.validate": validate._parser,  # noqa: SLF001
            "tools.convert_to_hf": convert_to_hf._parser, "tools.inspect_checkpoint": inspect_checkpoint._parser}  # noqa: SLF001


def doc_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) of each `python -m` command in docs/TPU.md's bash blocks, $VARIABLES filled in."""
    with open(os.path.join(ROOT, "docs", "TPU.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    for name, value in VALUES.items():
        text = text.replace(f"${name}", value)
    commands = []
    for line in re.findall(r"python -m (\S+[^\n]*)", text):
        line = re.split(r"'$|\s2>&1|\s\|", line.strip())[0]  # the end of gcloud's --command='...', a pipe
        module, *args = shlex.split(line)
        commands.append((module, args))
    return commands


def test_the_walkthrough_has_every_step():
    modules = [m for m, _ in doc_commands()]
    assert modules.count("tools.plan") == 4 and modules.count("bert_jax.training") == 2
    assert {"data_pipeline.pretokenize", "data_pipeline.validate", "tools.convert_to_hf"} <= set(modules)
    assert set(modules) <= set(ABSL) | set(ARGPARSE), modules
    training = [args for m, args in doc_commands() if m == "bert_jax.training"]
    assert all("--distributed=on" in a and "--workdir" in a and a[a.index("--workdir") + 1].startswith("gs://")
               for a in training) and "--break_lock" in training[1]


def test_argparse_commands_parse():
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
    for module, args in doc_commands():
        if module not in ARGPARSE:
            continue
        parsed, rest = ARGPARSE[module]().parse_known_args(args)
        assert parsed is not None
        if module == "data_pipeline.pretokenize":  # the rest goes to Beam: each flag one of its options
            assert parsed.runner == "DataflowRunner" and parsed.out.startswith("gs://bert-jax-test/")
            options = PipelineOptions(rest).get_all_options(retain_unknown_options=True)
            known = PipelineOptions(rest).get_all_options()
            assert options == known and known["project"] == "test" and known["max_num_workers"] == 50
        else:
            assert rest == [], (module, rest)


def test_absl_commands_parse_with_their_config():
    """Each training / plan command's flags and config overrides, parsed by the CLI's own parser in a fresh
    process (absl's flags are global): a bad flag or config key exits with an `error:` line."""
    for module, args in doc_commands():
        if module not in ABSL:
            continue
        code = (f"import sys; {ABSL[module]}; from absl import flags; parse(sys.argv); "
                "c = flags.FLAGS.config; print('config', c.model.hidden_size, c.mesh.fsdp, c.train.batch_size)")
        p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, check=False, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
        assert p.returncode == 0, (module, args, p.stderr[-2000:])
        size = 1024 if "configs/bert.py:large" in args else 768
        assert p.stdout.strip().splitlines()[-1] == f"config {size} -1 2048", p.stdout
