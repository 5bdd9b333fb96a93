"""``transformers``' SmolLM2 from the embedded GGUF, the independent reference of the real-model parity
tests (tests/test_model_smollm2.py, tests/test_sampler_real.py), loaded once per test run."""

import fcntl
import os
import pathlib
import shutil
import tempfile


def load_smollm2(gguf_path: pathlib.Path):
    """``transformers``' float32 SmolLM2 read from ``gguf_path`` by its own GGUF reader and
    dequantisation, in eval mode.

    Reading the GGUF takes ~20 s on 2 cores, so the first load of a test run saves the model under the
    run's temporary cache directory (``REMA_JAX_COMPILATION_CACHE``, tests/conftest.py: its config and
    state dict, renamed in atomically; a second worker waits on a lock meanwhile) and later loads, in
    any xdist worker, read that copy (~2.5 s): the same float32 values (checked: every tensor equal,
    logits identical, embeddings still tied)."""
    import torch
    import transformers

    target = pathlib.Path(os.environ["REMA_JAX_COMPILATION_CACHE"]) / "hf_smollm2_reference"
    with open(f"{target}.lock", "w") as lock:  # a second worker waits for the first one's copy
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "weights.pt").exists():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tmp = tempfile.mkdtemp(dir=target.parent, prefix=".hf_smollm2-")
            try:  # save_pretrained refuses a model read from GGUF: its config and state dict instead
                model.config.save_pretrained(tmp)
                torch.save(model.state_dict(), os.path.join(tmp, "weights.pt"))
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return model.eval()
    config = transformers.AutoConfig.from_pretrained(str(target))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(torch.load(target / "weights.pt", weights_only=True))
    return model.eval()
