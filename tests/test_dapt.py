"""The README's "Continue pretraining a released model on your domain": its commands, run as written (in a
scratch folder), with budget flags appended (later flags win): import all-MiniLM-L6-v2, pretokenize the standard
library's docstrings with its tokenizer, train with init_from and no shape overrides, export with --verify,
build the task, fine-tune."""

import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Continue pretraining a released model on your domain"
# Appended to the command that starts with the key: a small budget for a test.
BUDGET = {
    "python -m data_pipeline.pretokenize": "--max-documents 1500",
    "python -m bert_jax.training": "--config.train.steps=2 --config.optim.warmup_steps=1 --config.train.batch_size=8 "
                                   "--config.train.eval_batches=2",
    "python -m data_pipeline.tasks": "--cap 60 --min-docs 60",
    "python -m tools.finetune_hf": "--num-train 64 --epochs 1 --min-steps 0",
}


def readme_commands() -> list[str]:
    """The commands of the section's bash block, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_dapt_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) == 7 and commands[0].startswith("MODEL=")
    script = ["set -euo pipefail"]
    for i, command in enumerate(commands):
        extra = next((flags for start, flags in BUDGET.items() if command.startswith(start)), "")
        script.append(command if i == 0 else f"{command} {extra} > log{i}.txt 2>&1")
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # the README runs from the repository's root
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    p = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1500, check=False)
    logs = {i: (tmp_path / f"log{i}.txt").read_text() for i in range(1, len(commands))
            if (tmp_path / f"log{i}.txt").exists()}
    assert p.returncode == 0, (p.stderr[-2000:], {i: t[-1500:] for i, t in logs.items()})

    # The import says what comes next: the same pretokenize and training commands as the README's.
    assert "--vocab runs/minilm/tokenizer" in logs[1] or f"--vocab {tmp_path}/runs/minilm/tokenizer" in logs[1]
    assert "--config.init_from=" in logs[1]
    # Training took the imported model's shape, with no override of ours.
    assert "model from init_from=runs/minilm: 6 layers, hidden 384, 12 heads" in logs[3], logs[3][-3000:]
    assert "done: step 2" in logs[3]
    verify = json.loads(logs[4].strip().splitlines()[-1])
    assert verify["ok"] and verify["tokenizer_ids_match"], verify
    tuned = json.loads(logs[6].strip().splitlines()[-1])
    assert tuned["num_train"] == 64 and 0.0 <= tuned["accuracy"] <= 1.0 and tuned["model"] == "hf/dapt", tuned
