"""
Two-process ZeRO-2 training on gloo/CPU (torchrun) reaches the weights of one process trained on the
same global batch, and a mid-run save/reload of every rank's optimizer state continues identically.
"""

import os
import copy
import sys
import importlib.util
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_MUON_DTYPE")}
    env.update(NANOCHAT_DTYPE="float32", OMP_NUM_THREADS="1", NANOCHAT_ATTN="sdpa")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    # the same run on one process, here (stopping at SAVE_AT to compare optimizer state too)
    w = _load_worker()
    os.environ.pop("NANOCHAT_MUON_DTYPE", None)
    model = w.build_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = w.build_optimizer(model)
    w.train(model, opt, 0, w.SAVE_AT)
    single_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds live references, like torch's
    w.train(model, opt, w.SAVE_AT, w.STEPS)
    single = model.state_dict()

    # sharded optimizer state: each rank holds exactly its slice of the single-process state
    # (this also pins the gradient scale: a SUM instead of an AVG would show up 2x/4x in the moments)
    mids = [torch.load(tmp_path / f"mid_rank{r}.pt", weights_only=True)["optim"] for r in range(2)]
    params = [p for g in opt.param_groups for p in g["params"]]
    kinds = {"shard": 0, "full": 0, "muon_pad": 0}
    for gi, g in enumerate(opt.param_groups):
        for r, mid in enumerate(mids):
            if g["kind"] == "adamw":
                for i in mid["param_groups"][gi]["params"]:
                    ref_state, st = single_opt["state"][i], mid["state"][i]
                    n0 = params[i].shape[0]
                    sharded = st["exp_avg"].shape[0] != n0
                    kinds["shard" if sharded else "full"] += 1
                    sl = slice(r * n0 // 2, (r + 1) * n0 // 2) if sharded else slice(None)
                    for key in ("exp_avg", "exp_avg_sq"):
                        torch.testing.assert_close(st[key], ref_state[key][sl], rtol=1e-3, atol=1e-9)
            else:
                K, c = len(g["params"]), (len(g["params"]) + 1) // 2
                first = mid["param_groups"][gi]["params"][0]
                ref_buf = single_opt["state"][first]["momentum_buffer"]
                own = ref_buf[r * c:min((r + 1) * c, K)]
                kinds["muon_pad"] += K % 2
                if len(own):
                    torch.testing.assert_close(mid["state"][first]["momentum_buffer"], own, rtol=1e-4, atol=1e-7)
    assert all(kinds.values()), f"the model does not exercise every distributed path: {kinds}"

    final = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in range(2)]
    resumed = [torch.load(tmp_path / f"resumed_rank{r}.pt", weights_only=True) for r in range(2)]
    for k, ref in single.items():
        assert not torch.equal(ref, init[k]), f"{k} never changed"
        # every rank holds the same full weights after the all-gathers
        assert torch.equal(final[0][k], final[1][k]), k
        # resuming from per-rank optimizer state continues bitwise identically
        assert torch.equal(resumed[0][k], final[0][k]) and torch.equal(resumed[1][k], final[1][k]), k
        # two ranks on half batches == one process on the whole batch, up to fp32 summation order.
        # Elementwise tolerances would be wrong here: AdamW (eps=1e-10) turns rounding noise in a
        # near-zero gradient entry into a visible step, so we bound the per-tensor relative error.
        d = final[0][k] - ref
        assert d.norm() <= 1e-4 * ref.norm() and d.abs().max() < 1e-3, \
            f"{k}: max |diff| {d.abs().max():.2e}, relative {d.norm() / ref.norm():.2e}"
