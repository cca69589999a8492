"""The training loop (kvshare.training) on tiny CPU models: learning, exact resume, distillation, failures,
activation checkpointing; the fine-tuning entry point under torchrun (DDP, FSDP on gloo)."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from kvshare import convert, prepare, search, tokens
from kvshare.checkpoint import load_model
from kvshare.data import heldout_windows, load_tokens, tokenize_corpus
from kvshare.errors import KVShareError
from kvshare.merge import convert_model
from kvshare.plan import ModelShape, Plan, cla_pattern
from kvshare.training import TrainSettings, latest_checkpoint, lm_loss, train
from kvshare.training.activations import checkpoint_layers
from kvshare.training.loss import final_hidden
from tests.builders import make_cfg, pipeline_cfg, tiny_llama

CPU = torch.device("cpu")


def corpus(n: int = 6000, seed: int = 0) -> np.ndarray:
    """Tokens with structure a tiny model learns in a few steps: a noisy counter modulo 97."""
    rng = np.random.default_rng(seed)
    x = (np.arange(n) * 7 + (rng.random(n) < 0.1) * rng.integers(0, 97, n)) % 97
    return x.astype(np.uint32)


def settings(tmp_path, **kw) -> TrainSettings:
    base = dict(seq_len=32, micro_batch=2, global_batch=4, max_steps=6, lr=3e-3, warmup_fraction=0.2)
    return TrainSettings(**{**base, "resume_dir": str(tmp_path / "resume"), "progress": False, **kw})


def run(model, s, teacher=None, log=None):
    losses = {}

    def record(metrics, step):
        losses[step] = metrics
        if log:
            log(metrics, step)

    result = train(model, corpus(), corpus(2000, seed=1), s, CPU, teacher=teacher, log=record)
    return result, losses


def test_loss_falls_on_a_tiny_corpus(tmp_path):
    result, logs = run(tiny_llama(heads=4, kv_heads=2, layers=2), settings(tmp_path, max_steps=12, lr=1e-2))
    assert result.heldout_loss_after < result.heldout_loss_before - 1.0
    assert logs[12]["train_loss"] < logs[1]["train_loss"] - 1.0
    assert result.tokens == 12 * 4 * 32 and {"lr", "tokens_per_second", "mfu", "grad_norm"} <= logs[1].keys()


def test_resume_continues_from_the_right_step_with_identical_losses(tmp_path):
    _, straight = run(tiny_llama(layers=2), settings(tmp_path / "a", checkpoint_interval=3, max_steps=8))

    def kill_after_step_4(metrics, step):
        if step == 4:
            raise KeyboardInterrupt  # stands in for SIGKILL: step 4 never reaches a checkpoint

    s = settings(tmp_path / "b", checkpoint_interval=3, max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama(layers=2), s, log=kill_after_step_4)
    assert latest_checkpoint(s.resume_dir).name == "step-00000003"
    result, resumed = run(tiny_llama(layers=2, seed=1), s)  # other initial weights: all must come from the checkpoint
    assert result.resumed_from == 3 and sorted(resumed) == [4, 5, 6, 7, 8]
    for step in resumed:
        assert resumed[step]["train_loss"] == pytest.approx(straight[step]["train_loss"], abs=1e-6)
        assert resumed[step]["lr"] == straight[step]["lr"]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run(tiny_llama(layers=2), settings(tmp_path, checkpoint_interval=2, max_steps=2))
    with pytest.raises(KVShareError, match="other settings.*lr"):
        run(tiny_llama(layers=2), settings(tmp_path, checkpoint_interval=2, max_steps=2, lr=1e-3))


def test_fused_loss_matches_cross_entropy_and_kl_with_gradients():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(37, 16, dtype=torch.float64), torch.randn(101, 16, dtype=torch.float64)
    y = torch.randint(0, 101, (37,))
    loss, ce, kl = lm_loss(h, w, y, (th, tw), distill_weight=0.3, temperature=2.0, chunk=8)
    loss.backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    log_s, log_t = F.log_softmax(h @ w.T / 2, -1), F.log_softmax(th @ tw.T / 2, -1)
    ref_kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / 37
    ref = 0.7 * F.cross_entropy(h @ w.T, y) + 0.3 * 4 * ref_kl
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12) and kl.item() == pytest.approx(ref_kl.item(), abs=1e-12)
    assert torch.allclose(got[0], h.grad, atol=1e-12) and torch.allclose(got[1], w.grad, atol=1e-12)


def test_distillation_loss_is_zero_when_student_equals_teacher(tmp_path):
    model = tiny_llama(layers=2)
    _, logs = run(model, settings(tmp_path, max_steps=2, distill_weight=1.0), teacher=copy.deepcopy(model))
    for step in (1, 2):  # zero loss, zero gradient: the student stays the teacher
        assert logs[step]["distill_kl"] == pytest.approx(0, abs=1e-6)
        assert logs[step]["train_loss"] == pytest.approx(0, abs=1e-6)
        assert logs[step]["train_ce"] > 1


def test_heldout_split_never_overlaps_training(tmp_path):
    class CharTokenizer:  # one token per byte; EOS 256
        eos_token_id = 256

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

        def __len__(self):
            return 257

    docs = [f"document {i} " * (1 + i % 5) for i in range(300)]
    docs += docs[:50]  # repeated documents must land in the same split
    tokenize_corpus(CharTokenizer(), docs, tmp_path / "d", val_fraction=0.2)

    def split(name):
        tokens = np.fromfile(tmp_path / "d" / f"{name}.bin", dtype=np.uint32).tolist()
        text, out = [], []
        for t in tokens:
            if t == 256:
                out.append(bytes(text).decode())
                text = []
            else:
                text.append(t)
        return out

    train_docs, val_docs = split("train"), split("val")
    assert not set(train_docs) & set(val_docs)
    assert set(train_docs) | set(val_docs) == set(docs) and 20 < len(set(val_docs)) < 100


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama(layers=2)

    def poison_after_step_4(metrics, step):
        if step == 4:  # after step 4's checkpoint: the next forward gives NaN
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    s = settings(tmp_path, checkpoint_interval=2, max_steps=8)
    with pytest.raises(KVShareError, match="at step 5; stopped before updating") as e:
        run(model, s, log=poison_after_step_4)
    assert "\n" not in str(e.value) and "step-00000004" in str(e.value)
    ckpt = latest_checkpoint(s.resume_dir)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("kvshare.training.loss._Objective.forward", oom)
    with pytest.raises(KVShareError, match=r"micro_batch=2, seq_len=32: lower micro_batch"):
        run(tiny_llama(layers=2), settings(tmp_path, eval_windows=0))


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    from kvshare.training import setup_distributed

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist, device = setup_distributed(CPU)
    logs = {}
    s = TrainSettings(seq_len=32, micro_batch=1, global_batch=4, max_steps=3, lr=3e-3, progress=False)
    train(tiny_llama(layers=2), corpus(), corpus(2000, seed=1), s, device, dist, log=lambda m, k: logs.update({k: m}))
    if dist.main:
        with open(out, "w") as fh:
            json.dump({k: m["train_loss"] for k, m in logs.items()}, fh)
    torch.distributed.destroy_process_group()


def _spawn_two(rank_fn, out: str) -> None:
    """Run ``rank_fn(rank, world, port, out)`` on two gloo processes, on a free local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(rank_fn, args=(2, port, out), nprocs=2)


@pytest.mark.slow
def test_two_ranks_under_ddp_give_the_single_process_losses(tmp_path):
    import json

    out = tmp_path / "ddp.json"
    _spawn_two(_ddp_rank, str(out))
    ddp = {int(k): v for k, v in json.loads(out.read_text()).items()}
    s = TrainSettings(seq_len=32, micro_batch=1, global_batch=4, max_steps=3, lr=3e-3, progress=False)
    single = {}
    train(tiny_llama(layers=2), corpus(), corpus(2000, seed=1), s, CPU, log=lambda m, k: single.update({k: m}))
    assert ddp == pytest.approx({k: m["train_loss"] for k, m in single.items()}, abs=1e-5)


def _fsdp_settings(resume_dir=None) -> TrainSettings:
    return TrainSettings(
        seq_len=32,
        micro_batch=1,
        global_batch=4,
        max_steps=6,
        lr=3e-3,
        checkpoint_interval=3,
        resume_dir=resume_dir,
        eval_windows=4,
        eval_interval=3,
        progress=False,
        parallel="fsdp",
    )


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os
    from unittest import mock

    from kvshare.data import Windows
    from kvshare.training import setup_distributed, trained_model

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist, device = setup_distributed(CPU)
    s = _fsdp_settings(f"{out}/resume")
    logs = {}

    def fsdp_run(model):
        return train(model, corpus(), corpus(2000, seed=1), s, device, dist, log=lambda m, k: logs.update({k: m}))

    batch = Windows.batch

    def killed_after_step_5(windows, first, n):
        if first >= 5 * s.global_batch:  # on every rank, before step 6: its checkpoint at step 3 is the last
            raise KeyboardInterrupt
        return batch(windows, first, n)

    with mock.patch.object(Windows, "batch", killed_after_step_5), pytest.raises(KeyboardInterrupt):
        fsdp_run(tiny_llama(layers=2))
    killed = {k: m["train_loss"] for k, m in logs.items()}
    logs.clear()
    model = tiny_llama(layers=2, seed=1)  # other initial weights: all must come from the checkpoint
    result = fsdp_run(model)
    weights = trained_model(model, dist)  # every rank takes part
    if dist.main:
        resumed = {k: m["train_loss"] for k, m in logs.items()}
        report = {"killed": killed, "resumed": resumed, "from": result.resumed_from, "after": result.heldout_loss_after}
        with open(f"{out}/fsdp.json", "w") as fh:
            json.dump(report, fh)
        torch.save(weights.state_dict(), f"{out}/weights.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_under_fsdp_give_the_single_process_losses_and_resume_exactly(tmp_path):
    import json

    _spawn_two(_fsdp_rank, str(tmp_path))
    fsdp = json.loads((tmp_path / "fsdp.json").read_text())
    killed = {int(k): v for k, v in fsdp["killed"].items()}
    resumed = {int(k): v for k, v in fsdp["resumed"].items()}
    assert sorted(killed) == [1, 2, 3, 4, 5] and fsdp["from"] == 3 and sorted(resumed) == [4, 5, 6]
    for step in (4, 5):  # the steps both runs took, from the same state: the same losses
        assert resumed[step] == pytest.approx(killed[step], abs=1e-6)

    single, logs = tiny_llama(layers=2), {}
    s = replace(_fsdp_settings(), parallel="ddp", checkpoint_interval=0)
    result = train(single, corpus(), corpus(2000, seed=1), s, CPU, log=lambda m, k: logs.update({k: m}))
    # float32; only the order in which gradients are summed over micro-batches and ranks differs
    # (about 1e-7 relative per step), as under DDP.
    assert killed | resumed == pytest.approx({k: m["train_loss"] for k, m in logs.items()}, abs=1e-5)
    assert fsdp["after"] == pytest.approx(result.heldout_loss_after, abs=1e-5)
    weights = torch.load(tmp_path / "weights.pt")  # gathered on rank 0, as the stages save it
    assert weights.keys() == single.state_dict().keys()
    for name, value in single.state_dict().items():
        assert torch.allclose(weights[name], value, atol=1e-5), name


def test_parallel_is_checked(tmp_path):
    with pytest.raises(KVShareError, match=r"^finetune.parallel='zero' is not one of: ddp, fsdp$"):
        run(tiny_llama(layers=2), settings(tmp_path, parallel="zero"))
    with pytest.raises(KVShareError, match=r"parallel=fsdp shards the model over several processes: .*torchrun"):
        run(tiny_llama(layers=2), settings(tmp_path, parallel="fsdp"))


def kv_variant(name: str):
    """A tiny GQA Llama, or a kvshare model converted from it: unequal groups, cross-layer sharing, or both."""
    base = tiny_llama(heads=8, kv_heads=4, layers=4)
    shape = ModelShape.of(base.config)
    unequal = Plan(shape, ((2, 0, 2, 1), (0, 1, 1, 2), (0, 1, 2, 3), (0, 0, 1, 1)), tuple(range(4)), "qcqa-ac")
    plans = {
        "qcqa-ac": unequal,
        "cla2": Plan.identity(shape).with_cla(cla_pattern(4, 2)),
        "qcqa-ac+cla": unequal.with_cla([0, 0, 0, 3], "mean"),  # layer 0's K/V serve layers 1 and 2 too
    }
    return base if name == "gqa" else convert_model(base, plans[name])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["gqa", "qcqa-ac", "cla2", "qcqa-ac+cla"])
def test_activation_checkpointing_recomputes_each_layer_with_the_same_loss_and_gradients(variant, attn):
    windows = torch.from_numpy(corpus(4 * 33).astype(np.int64)).view(4, 33)
    loss, grads, runs = {}, {}, {}
    for on in (False, True):
        model = kv_variant(variant).train()
        model.config._attn_implementation = attn
        if on:
            checkpoint_layers(model)
        ran = []
        for layer in model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_, ran=ran: ran.append(1))
        h = final_hidden(model, windows[:, :-1])
        loss[on] = lm_loss(h.flatten(0, 1), model.get_output_embeddings().weight, windows[:, 1:].flatten())[0]
        loss[on].backward()
        grads[on] = {name: p.grad for name, p in model.named_parameters()}
        runs[on] = len(ran)
    assert runs == {False: 4, True: 8}  # checkpointed, each layer ran again in the backward pass
    assert loss[True].item() == pytest.approx(loss[False].item(), abs=1e-6)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("variant", ["gqa", "cla2"])
def test_training_with_activation_checkpointing_gives_the_same_losses(tmp_path, variant):
    results, logs = {}, {}
    for on in (False, True):
        s = settings(tmp_path / str(on), max_steps=3, eval_interval=2, eval_windows=2, activation_checkpointing=on)
        results[on], logs[on] = run(kv_variant(variant), s)
    assert sorted(logs[True]) == sorted(logs[False]) == [1, 2, 3]
    for step, metrics in logs[False].items():
        for key in ("train_loss", "grad_norm", "heldout_loss"):
            if key in metrics:
                assert logs[True][step][key] == pytest.approx(metrics[key], abs=1e-6), (step, key)
    assert results[True].heldout_loss_after == pytest.approx(results[False].heldout_loss_after, abs=1e-6)


@pytest.mark.slow
def test_activation_checkpointing_of_compiled_cla_layers_gives_the_eager_losses(tmp_path, monkeypatch):
    """torch.compile traces each checkpoint into the decoder's graph, K/V hand-over included, without a graph break.

    The aot_eager backend: dynamo and AOTAutograd (which plans the recompute), without inductor's slow C++ builds.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "aot_eager"}))
    monkeypatch.setattr("kvshare.training.loss._compiled_chunk", None)
    torch._dynamo.reset()
    counters.clear()
    s = settings(tmp_path / "compiled", max_steps=3, eval_windows=0, compile=True, activation_checkpointing=True)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):  # as train finds it
        _, compiled = run(kv_variant("cla2"), s)
    assert not counters["graph_break"], dict(counters["graph_break"])
    _, eager = run(kv_variant("cla2"), settings(tmp_path / "eager", max_steps=3, eval_windows=0))
    for step, metrics in eager.items():
        assert compiled[step]["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-5), step


def test_pretrain_writes_loadable_checkpoints_in_any_layout_from_the_same_tokens(tmp_path):
    import json

    from kvshare import pretrain
    from kvshare.plan import Plan

    def cfg(layout, *o):
        return make_cfg(
            tmp_path,
            "pretrain",
            "model.num_hidden_layers=2",
            f"pretrain.layout={layout}",
            f"pretrain.out={tmp_path}/{layout}",
            "pretrain.max_steps=3",
            "pretrain.seq_len=32",
            "pretrain.micro_batch=2",
            "pretrain.global_batch=4",
            "pretrain.eval_windows=2",
            "pretrain.progress=false",
            *o,
        )

    mha = pretrain.run(cfg("mha"))
    cla = pretrain.run(cfg("mqa+cla2", f"pretrain.tokenizer={tmp_path}/mha"))
    assert mha["train_tokens_sha256"] == cla["train_tokens_sha256"]  # same tokenizer, same tokens
    assert mha["kv_fraction"] == 1 and cla["kv_fraction"] == 1 / 16  # 1 of 8 KV heads, every other layer
    assert json.loads((tmp_path / "mha" / "kvshare_base.json").read_text())["kv_heads"] == 8
    for layout, model_type in (("mha", "llama"), ("mqa+cla2", "kvshare_llama")):
        spec = json.loads((tmp_path / layout / "kvshare_spec.json").read_text())
        plan = Plan.from_dict(spec["plan"])
        model, _ = load_model(tmp_path / layout)
        assert model.config.model_type == model_type and spec["runs"]["pretrain"]
        x = torch.randint(0, model.config.vocab_size, (1, 16))
        with torch.no_grad():
            cache = model(x, use_cache=True).past_key_values
        from kvshare.modeling import cache_bytes

        assert cache_bytes(cache) == plan.kv_bytes_per_token(4) * 16
        assert not (tmp_path / f"{layout}.resume").exists()


@pytest.mark.slow
def test_finetune_entry_point_under_torchrun_matches_one_process_in_ddp_and_fsdp(tmp_path):
    """``python -m kvshare.finetune`` on 1 process, and under ``torchrun`` on 2 gloo ranks with DDP and FSDP."""

    cfg = pipeline_cfg(tmp_path, "model.num_hidden_layers=2")
    prepare.run(cfg("prepare", f"prepare.out={tmp_path}/base"))
    tokens.run(cfg("tokenize", f"tokenize.model_dir={tmp_path}/base", f"tokenize.out={tmp_path}/data"))
    search.run(
        cfg("search", "search.progress=false", f"search.model_dir={tmp_path}/base", "search.method=gqa",
            f"search.out={tmp_path}/p.json")
    )  # fmt: skip
    convert.run(
        cfg("convert", f"convert.model_dir={tmp_path}/base", f"convert.plan={tmp_path}/p.json",
            f"convert.out={tmp_path}/ck")
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    launchers = {
        "single": [sys.executable],
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
        "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    }
    for name, launcher in launchers.items():
        parallel = "fsdp" if name == "fsdp" else "ddp"
        args = [
            "-m", "kvshare.finetune", "device=cpu", "study=torchrun", f"name={name}", f"mlflow.tracking_uri={uri}",
            f"finetune.checkpoint={tmp_path}/ck", f"finetune.data_dir={tmp_path}/data", f"finetune.out={tmp_path}/{name}",
            "finetune.seq_len=32", "finetune.micro_batch=2", "finetune.global_batch=4", "finetune.max_steps=4",
            "finetune.lr=3e-3", "finetune.compile=false", "finetune.bf16=false", "finetune.checkpoint_interval=2",
            "finetune.eval_windows=4", "finetune.progress=false", "finetune.peak_flops=1e12",
            f"finetune.parallel={parallel}",
        ]  # fmt: skip
        proc = subprocess.run([*launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-4000:]}"
        assert not (tmp_path / f"{name}.resume").exists()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("torchrun").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["finetune:ddp", "finetune:fsdp", "finetune:single"]  # rank 0 only
    losses, metrics = {}, {}
    for r in runs:
        name = r.info.run_name.split(":")[1]
        losses[name] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train_loss")}
        metrics[name] = r.data.metrics
        assert json.loads((tmp_path / name / "kvshare_spec.json").read_text())["runs"]["finetune"] == r.info.run_id
    assert sorted(losses["single"]) == [1, 2, 3, 4]
    for name in ("ddp", "fsdp"):  # same windows per step by design; float32 sums in another order only
        assert losses[name] == pytest.approx(losses["single"], abs=1e-5)
        ratio = metrics[name]["mfu"] / metrics[name]["tokens_per_second"]
        assert ratio == pytest.approx(metrics["single"]["mfu"] / metrics["single"]["tokens_per_second"] / 2)  # 2 ranks

    heldout = heldout_windows(load_tokens(tmp_path / "data", "val"), 32, 4)
    weights = {}
    for name in launchers:
        model, _ = load_model(tmp_path / name)
        weights[name] = model.state_dict()
        with torch.no_grad():
            logits = model(heldout[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].flatten()).item()
        assert loss == pytest.approx(metrics[name]["heldout_loss_after"], abs=1e-5)
    for name in ("ddp", "fsdp"):
        assert weights[name].keys() == weights["single"].keys()
        for key, value in weights["single"].items():
            assert torch.allclose(weights[name][key], value, atol=1e-5), (name, key)
