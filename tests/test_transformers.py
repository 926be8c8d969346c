"""warmpool.integrations.transformers: a real transformers Llama on the pool's views.

Each model is a tiny random Llama written by transformers itself (several shards, tied
and untied embeddings), uploaded to the S3 test server and warmed from there; the
serving side runs in a fresh process, as a serving process would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pool_env import run_cli, run_python
from tests.servers import Backend
from tests.tiny_llama import LlamaShape, write_tiny_llama
from warmpool.config import Settings

PROMPT = [[1, 17, 42, 99, 5, 250, 3, 77]]


def upload(backend: Backend, src: Path, prefix: str) -> str:
    for f in sorted(src.iterdir()):
        backend.put(prefix + f.name, f.read_bytes())
    return str(backend.uri_for(prefix))


SERVING = r"""
import gc, json, subprocess, sys, torch
from transformers import LlamaForCausalLM
from warmpool.integrations.transformers import attachment_of, load_model
from warmpool.pool.host import HostTier
from warmpool.config import Settings

uri, src = sys.argv[1], sys.argv[2]
prompt = torch.tensor(%(prompt)s)
model = load_model(uri)
with torch.no_grad():
    got = model(prompt).logits
    want = LlamaForCausalLM.from_pretrained(src).eval()(prompt).logits
weights = attachment_of(model)
segment = HostTier(Settings.load().runtime_dir).prefix
ranges = []
for line in open("/proc/self/maps"):
    if segment in line:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        ranges.append((lo, hi))
params = dict(model.named_parameters(remove_duplicate=False))
in_segment = sum(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params.values())
same_as_views = sum(p.data_ptr() == weights[n].data_ptr()
                    for n, p in params.items() if n in weights)
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
buffers_on_meta = [n for n, b in model.named_buffers() if b.device.type == "meta"]
evict = lambda: subprocess.run([sys.executable, "-m", "warmpool.cli", "evict", uri],
                               capture_output=True, text=True)
while_alive = evict()
del model, params
gc.collect()
after = evict()
print(json.dumps({
    "equal": bool(torch.equal(got, want)),
    "params": len(dict(LlamaForCausalLM.from_pretrained(src).named_parameters(
        remove_duplicate=False))),
    "in_segment": in_segment, "same_as_views": same_as_views, "views": len(weights),
    "tied": tied, "buffers_on_meta": buffers_on_meta,
    "evict_alive": [while_alive.returncode, while_alive.stderr + while_alive.stdout],
    "evict_after": [after.returncode, after.stderr + after.stdout]}))
""" % {"prompt": PROMPT}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_load_model_gives_from_pretrained_logits_on_views_and_holds_its_lease(
        s3_backend: Backend, settings: Settings, tmp_path: Path, tied: bool) -> None:
    src = tmp_path / "llama"
    assert write_tiny_llama(src, LlamaShape(tied=tied), seed=1234) > 1
    uri = upload(s3_backend, src, "llama/")
    proc = run_cli("prefetch", uri)
    assert proc.returncode == 0, proc.stderr

    out = run_python(SERVING, timeout=300, argv=[uri, str(src)])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["equal"], "logits differ from from_pretrained of the same files"
    # Every parameter (the tied lm_head included) is a view inside the shared segment.
    assert report["in_segment"] == report["params"]
    assert report["same_as_views"] == report["views"]
    assert report["tied"] is tied
    assert report["buffers_on_meta"] == []
    code, text = report["evict_alive"]
    assert code != 0 and "lease" in text.lower(), text
    code, text = report["evict_after"]
    assert code == 0, text


def test_release_ends_the_lease_before_the_model_is_collected(
        settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "llama"
    write_tiny_llama(src, LlamaShape(tied=False), seed=1234)
    assert run_cli("prefetch", str(src)).returncode == 0
    code = r"""
import subprocess, sys
from warmpool.integrations.transformers import load_model, release
model = load_model(sys.argv[1])
release(model)
done = subprocess.run([sys.executable, "-m", "warmpool.cli", "evict", sys.argv[1]],
                      capture_output=True, text=True)
print(done.returncode, model.lm_head.weight.float().abs().sum().item() > 0)
"""
    out = run_python(code, argv=[str(src)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["0", "True"]


def rename_tensor(src: Path, old: str, new: str) -> None:
    """Rename one tensor in its shard and in the index (a checkpoint from another code base)."""
    from safetensors.torch import load_file, save_file

    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"].pop(old)
    index["weight_map"][new] = shard.name
    tensors = load_file(shard)
    tensors[new] = tensors.pop(old)
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_a_checkpoint_whose_names_do_not_match_the_module_is_refused_naming_the_tensor(
        settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "llama"
    write_tiny_llama(src, LlamaShape(tied=False), seed=1234)
    rename_tensor(src, "model.norm.weight", "model.final_norm.weight")
    assert run_cli("prefetch", str(src)).returncode == 0
    code = r"""
import sys
from warmpool.integrations.transformers import CheckpointMismatchError, load_model
try:
    load_model(sys.argv[1])
except CheckpointMismatchError as exc:
    print("refused:", exc)
"""
    out = run_python(code, argv=[str(src)])
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "model.final_norm.weight" in out.stdout
    # Nothing half-loaded holds the entry: it can be evicted without --force.
    assert run_cli("evict", str(src)).returncode == 0


def test_a_model_that_is_not_warm_is_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    code = r"""
import sys
from warmpool import NotWarmError
from warmpool.integrations.transformers import load_model
try:
    load_model(sys.argv[1])
except NotWarmError as exc:
    print("not warm:", exc)
"""
    out = run_python(code, argv=[str(tmp_path / "nothing")])
    assert out.returncode == 0, out.stderr
    assert "not warm:" in out.stdout and "warmpool prefetch" in out.stdout


def test_another_dtype_gives_private_copies_and_holds_no_lease(
        settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "llama"
    write_tiny_llama(src, LlamaShape(tied=True), seed=1234)
    assert run_cli("prefetch", str(src)).returncode == 0
    code = r"""
import subprocess, sys, torch
from safetensors.torch import load_file
from warmpool.integrations.transformers import attachment_of, load_model
model = load_model(sys.argv[1], dtype=torch.float32)
w = model.model.layers[0].mlp.down_proj.weight
shard = [p for p in __import__("pathlib").Path(sys.argv[1]).glob("*.safetensors")
         if "model.layers.0.mlp.down_proj.weight" in load_file(p)][0]
want = load_file(shard)["model.layers.0.mlp.down_proj.weight"].float()
done = subprocess.run([sys.executable, "-m", "warmpool.cli", "evict", sys.argv[1]],
                      capture_output=True, text=True)
print(w.dtype, torch.equal(w, want), attachment_of(model) is None, done.returncode)
"""
    out = run_python(code, argv=[str(src)])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["torch.float32", "True", "True", "0"]
