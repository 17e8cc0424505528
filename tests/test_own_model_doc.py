"""docs/own-model.md's commands, run as written on a tiny model of the kind it describes, with only
overrides that shrink the run appended."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.dist_utils import REPO
from tests.test_own_model import make_model

pytestmark = pytest.mark.spawn  # every test here starts processes (conftest.py checks it)

SCRIPTS = {"relora-prepare-data": "tools/prepare_data.py", "relora-pretrain": "launchers/pretrain.py",
           "relora-convert": "tools/convert_ckpt.py", "relora-eval": "tools/eval.py"}
SHRINK = {"relora-pretrain": ["--data.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=4",
                              "--train.eval_tokens=256", "--train.eval_every=0", "--train.precision=fp32",
                              "--relora.warm_start_steps=4", "--relora.cycle_length=4", "--relora.first_warmup=1",
                              "--relora.restart_warmup=1", "--relora.r=8", "--train.max_steps=16",
                              "--logging.progress_bar=false"],
          # the export records no training length: evaluate it at the run's (the checkpoint's is read)
          "relora-eval": ["--seq_len=32"]}


def doc_commands() -> list[list[str]]:
    text = (REPO / "docs" / "own-model.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.strip()]


def test_doc_commands_run(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relora_dist.data import DEFAULT_CORPUS, load_documents

    docs = load_documents([str(DEFAULT_CORPUS)])["text"][:200]
    (tmp_path / "my.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    make_model(tmp_path / "my_model", "llama", num_key_value_heads=2, tie_word_embeddings=True)
    commands = doc_commands()
    assert list(dict.fromkeys(c[0] for c in commands)) == list(SCRIPTS)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for cmd in commands:
        argv = [sys.executable, str(REPO / SCRIPTS[cmd[0]]), *cmd[1:], *SHRINK.get(cmd[0], [])]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        if cmd[0] == "relora-pretrain":
            assert "reset 2" in proc.stdout
        if cmd[0] == "relora-eval" and "run" in cmd:  # printed to 6 decimals: the run's last eval
            own, logged = map(float, re.fullmatch(r"loss (\S+) .* loss (\S+)", proc.stdout.strip()).groups())
            assert abs(own - logged) <= 2e-6, proc.stdout
    out = tmp_path / "my_model_relora"
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 2
    assert AutoTokenizer.from_pretrained(out)("In the beginning", add_special_tokens=False).input_ids
    result = json.loads((tmp_path / "eval.json").read_text())  # the export on the whole val split
    assert result["seq_len"] == 32 and result["blocks"] > 8 and 0 < result["loss"] < 10
