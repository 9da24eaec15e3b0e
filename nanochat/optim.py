"""
One optimizer for the whole model: AdamW for embeddings, value embeddings, the head and the scalars; Muon
(Nesterov momentum -> MuonEq -> Polar Express -> Muon+ -> NorMuon -> cautious weight decay) for the block
matrices, one group per shape, stacked (K, rows, cols) so every Muon operation is one batched kernel.

Under torch.distributed with world_size > 1 it runs a ZeRO-2 style step (https://arxiv.org/abs/1910.02054):
the model is not DDP-wrapped; step() reduce-scatters the gradients, updates the shard this rank owns (state
exists only for it) and all-gathers the new weights. So state_dict() is per rank (resume at the same world size).

Schedules set group["lr"], group["momentum"] and group["weight_decay"] before each step. When compiled (on
CUDA by default, anywhere with compile=True) the math gets those as 0-D CPU tensors, so changing them never
recompiles; on one process the whole step (every group) is then one graph.
"""

import os
import math

import torch
import torch.distributed as dist

# Polar Express coefficients (https://arxiv.org/abs/2505.16932, safety factor 2e-2, cushion 2)
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all-reduced and replicated, not sharded
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_GROUP_DEFAULTS = {"adamw": dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                   "muon": dict(momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)}

# The math, as plain functions on tensors (tests call them directly) ----------

def polar_express(X, ns_steps=5):
    """Approximate the orthogonal polar factor U V^T of each matrix in X (K, rows, cols).
    X must already have spectral norm <= 1 (we divide by the Frobenius norm before calling)."""
    tall = X.size(-2) > X.size(-1)
    for i in range(ns_steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        # The Gram matrix is taken on the small side: (cols, cols) for tall, (rows, rows) for wide.
        # baddbmm: each scale-and-add rides on its matmul (no separate passes; no kernels to compile)
        A = X.mT @ X if tall else X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def muon_math(grad, param, mom_buf, var_buf, lr, wd, momentum, beta2, ns_steps: int, ortho_dtype: torch.dtype):
    """One Muon step on a stack of K matrices (Muon: https://kellerjordan.github.io/posts/muon/; NorMuon's
    variance normalization: https://arxiv.org/abs/2510.05491). grad, param, mom_buf: (K, rows, cols) fp32;
    var_buf: (K, rows, 1) or (K, 1, cols) fp32, updated in place. lr (already shape-scaled), wd, momentum,
    beta2: 0-D CPU tensors. Returns the new params (K, rows, cols)."""
    rows, cols = grad.shape[-2], grad.shape[-1]
    # 1. Nesterov momentum: buf <- mu*buf + (1-mu)*g ; u <- (1-mu)*g + mu*buf
    # (plain mul/add rather than lerp: lerp refuses a CPU 0-D weight next to CUDA tensors in eager mode)
    mom_buf.mul_(momentum).add_((1 - momentum) * grad)
    U = (1 - momentum) * grad + momentum * mom_buf
    # 3. MuonEq: every row rescaled to the matrix's mean row norm (so the Frobenius norm is kept)
    fro = U.norm(dim=(-2, -1), keepdim=True)                                   # (K, 1, 1)
    U = U * ((fro / math.sqrt(rows)) / U.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    # 4. Frobenius normalize so the spectral norm is < 1 before the polynomial iteration
    X = U / (U.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    # 5. Polar Express in the orthogonalization dtype (bf16 on GPUs, fp32 on CPUs)
    X = polar_express(X.to(ortho_dtype), ns_steps).float()
    # 6. Muon+: renormalize to the Frobenius norm of an exactly orthogonal matrix
    O = X * (math.sqrt(min(rows, cols)) / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # 7. NorMuon: factored second moment over the longer side, one statistic per row (or column)
    red_dim, n = (-1, cols) if rows >= cols else (-2, rows)
    v_mean = O.square().mean(dim=red_dim, keepdim=True)                        # (K, rows, 1) / (K, 1, cols)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()           # (K, 1, 1)
    var_buf.mul_(beta2).add_((1 - beta2) * v_mean)
    scale = var_buf.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * scale.square()).sum(dim=(-2, -1), keepdim=True).mul(n).sqrt()
    O = O * (scale * (norm_before / norm_after.clamp_min(1e-10)))
    # 8. cautious weight decay: decay only where the update and the weight agree in sign
    mask = (O * param >= 0).to(param.dtype)
    return param - lr * O - (lr * wd) * (param * mask)


_compiled_muon_math = None
_compiled_step_math = None
_compile_backend = "inductor"  # tests swap in a counting backend to check graph breaks and recompiles


def _compile_enabled(device, compile=None):
    """NANOCHAT_OPTIM_COMPILE=0/1 forces compilation off/on (tests, experiments); else `compile` (the training
    precision policy's choice, passed down by the scripts); else on CUDA only."""
    mode = os.environ.get("NANOCHAT_OPTIM_COMPILE", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return device.type == "cuda" if compile is None else bool(compile)


def _muon_fn(device, compile=None):
    """The Muon math for one group (the distributed step), torch.compile'd when _compile_enabled (fuses the
    elementwise chains; the 0-D hyper-parameter tensors keep changing values from triggering recompiles)."""
    global _compiled_muon_math
    if not _compile_enabled(device, compile):
        return muon_math
    if _compiled_muon_math is None:
        _compiled_muon_math = torch.compile(muon_math, dynamic=False, fullgraph=True, backend=_compile_backend)
    return _compiled_muon_math


def adam_update(p32, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2):
    """The AdamW arithmetic on fp32 tensors, in torch.optim.AdamW's order; m and v are updated in place, the new
    weights returned. Hyper-parameters (bc1, bc2 = the bias corrections 1 - beta ** step) are floats, or 0-D CPU
    tensors when compiled (new values never recompile). Plain mul/add rather than lerp/addcmul: those refuse a
    CPU 0-D weight beside CUDA tensors."""
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    denom = v.sqrt() / bc2 ** 0.5 + eps
    return p32 * (1 - lr * wd) - (lr / bc1) * m / denom


def adamw_math(p, grad, state, lr, beta1, beta2, eps, wd):
    """One eager AdamW step on (a slice of) one parameter, state kept like torch.optim.AdamW's."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                     exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
    state["step"] += 1
    t = state["step"]
    p.copy_(adam_update(p.float(), grad.float(), state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd,
                        1 - beta1 ** t, 1 - beta2 ** t))


def step_math(adamw_groups, muon_groups, ortho_dtype: torch.dtype):
    """A whole single-process step as one function (compiled as one graph): adam_update and muon_math, every
    hyper-parameter a 0-D tensor (the bias corrections too, so the step count never recompiles).
    adamw_groups: (params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, wd, bc1, bc2);
    muon_groups: (params, grads, momentum_buffer, second_momentum_buffer, lr, wd, momentum, beta2, ns_steps)."""
    for params, grads, exp_avgs, exp_avg_sqs, *hp in adamw_groups:
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            p.copy_(adam_update(p.float(), g.float(), m, v, *hp))
    for params, grads, mom_buf, var_buf, lr, wd, momentum, beta2, ns_steps in muon_groups:
        new = muon_math(torch.stack(grads).float(), torch.stack(params).float(), mom_buf, var_buf, lr, wd, momentum,
                        beta2, ns_steps, ortho_dtype)
        for i, p in enumerate(params):
            p.copy_(new[i])


def _step_fn():
    global _compiled_step_math
    if _compiled_step_math is None:
        _compiled_step_math = torch.compile(step_math, dynamic=False, fullgraph=True, backend=_compile_backend)
    return _compiled_step_math

# Collectives -----------------------------------------------------------------
# NCCL has reduce_scatter_tensor / all_gather_into_tensor / AVG; gloo has none of the three, so there a
# reduce-scatter is all_reduce(SUM) + slice + divide by W, and an all-gather is dist.all_gather into views.

class _Pending:
    """An async collective (None: a local step) plus what to do once it has finished (gloo post-processing)."""
    def __init__(self, work, finish=None):
        self.work, self.finish = work, finish

    def wait(self):
        if self.work is not None:
            self.work.wait()
        return self.finish() if self.finish is not None else None


def _reduce_scatter_avg(full, rank, world):
    """full: (W*c, ...) -> this rank's averaged chunk (c, ...), returned by .wait()."""
    c = full.size(0) // world
    if dist.get_backend() == "nccl":
        out = full.new_empty((c,) + full.shape[1:])
        return _Pending(dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True), lambda: out)
    work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
    return _Pending(work, lambda: full[rank * c:(rank + 1) * c].div_(world))


def _all_reduce_avg(t, world):
    if dist.get_backend() == "nccl":
        return _Pending(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True), lambda: t)
    return _Pending(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True), lambda: t.div_(world))


def _all_gather(full, chunk, world):
    """Gather every rank's chunk (c, ...) into full (W*c, ...)."""
    if dist.get_backend() == "nccl":
        return _Pending(dist.all_gather_into_tensor(full, chunk, async_op=True))
    return _Pending(dist.all_gather(list(full.chunk(world)), chunk.clone(), async_op=True))


class MuonAdamW(torch.optim.Optimizer):
    """MuonAdamW(param_groups) with each group a dict:
      kind="adamw": params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
      kind="muon":  params (all the same 2-D shape), lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0
    Every group also gets initial_lr (= lr at construction) for LR schedules.
    muon_dtype: orthogonalization dtype; $NANOCHAT_MUON_DTYPE overrides it; default bf16 on CUDA (fp32 on GPUs
    without bf16) and fp32 elsewhere (bf16 matmul is slow or emulated on many CPUs: GPT.setup_optimizers asks
    for bf16 where the model computes in bf16).
    compile: torch.compile the step (None: on CUDA only; $NANOCHAT_OPTIM_COMPILE=0/1 overrides it)."""

    def __init__(self, param_groups, muon_dtype=None, compile=None):
        groups = []
        for i, g in enumerate(param_groups):
            kind = g.get("kind")
            if kind not in _GROUP_DEFAULTS:
                raise ValueError(f"param group {i} needs kind='adamw' or kind='muon', got {kind!r}")
            g = {**_GROUP_DEFAULTS[kind], **g, "params": list(g["params"])}
            shapes = {tuple(p.shape) for p in g["params"]}
            if kind == "muon" and (len(shapes) != 1 or len(next(iter(shapes))) != 2):
                raise ValueError(f"muon group {i} must hold 2-D params of one shape, got shapes {sorted(shapes)}; "
                                 "make one group per distinct matrix shape")
            if "lr" not in g:
                raise ValueError(f"param group {i} ({kind}) has no 'lr'")
            g.setdefault("initial_lr", g["lr"])
            groups.append(g)
        super().__init__(groups, defaults={})
        choice = os.environ.get("NANOCHAT_MUON_DTYPE") or muon_dtype
        if choice is not None and not isinstance(choice, torch.dtype):
            if choice not in _DTYPES:
                raise ValueError(f"NANOCHAT_MUON_DTYPE / muon_dtype must be one of {sorted(_DTYPES)}, got {choice!r}")
            choice = _DTYPES[choice]
        self.muon_dtype = choice
        self.compile = compile
        # 0-D CPU tensors carrying the scheduled values into the (compiled) math, per group
        self._hp = {}

    def _hparams(self, group, **values):
        """The group's hyper-parameters as 0-D fp32 CPU tensors (the same tensors every step, refilled)."""
        hp = self._hp.setdefault(id(group), {})
        for k, v in values.items():
            hp.setdefault(k, torch.tensor(0.0, dtype=torch.float32)).fill_(v)
        return [hp[k] for k in values]

    def _ortho_dtype(self, device):
        if self.muon_dtype is not None:
            return self.muon_dtype
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    @staticmethod
    def _dist_info():
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _muon_state(self, group, n, rows, cols, device):
        """Muon's stacked buffers, kept on the group's first param."""
        state = self.state[group["params"][0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros((n, rows, cols), dtype=torch.float32, device=device)
            vshape = (n, rows, 1) if rows >= cols else (n, 1, cols)
            state["second_momentum_buffer"] = torch.zeros(vshape, dtype=torch.float32, device=device)
        return state["momentum_buffer"], state["second_momentum_buffer"]

    def _muon_hparams(self, group):
        rows, cols = group["params"][0].shape
        return self._hparams(group, lr=group["lr"] * math.sqrt(max(1.0, rows / cols)),
                             wd=group["weight_decay"], momentum=group["momentum"], beta2=group["beta2"])  # (6.3)

    def _muon_group(self, group, grads, params):
        """Run Muon on stacks grads/params (n, rows, cols); state lives on the group's first param."""
        mom, var = self._muon_state(group, *grads.shape, grads.device)
        fn = _muon_fn(grads.device, self.compile)
        return fn(grads.float(), params.float(), mom, var, *self._muon_hparams(group), group["ns_steps"],
                  self._ortho_dtype(grads.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._dist_info()
        if world == 1:
            self._step_single()
        else:
            self._step_distributed(rank, world)
        return loss

    def _step_single(self):
        params = [p for g in self.param_groups for p in g["params"]]
        if params and _compile_enabled(params[0].device, self.compile) and all(p.grad is not None for p in params):
            return self._step_compiled()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "adamw":
                b1, b2 = group["betas"]
                for p in params:
                    adamw_math(p, p.grad, self.state[p], group["lr"], b1, b2, group["eps"], group["weight_decay"])
            else:
                if len(params) != len(group["params"]):
                    raise RuntimeError("a muon group has params with and without grads; Muon state is stacked "
                                       "over the whole group, so all of them need a grad (or none)")
                new = self._muon_group(group, torch.stack([p.grad for p in params]), torch.stack(params))
                torch._foreach_copy_(params, list(new.unbind(0)))

    def _step_compiled(self):
        """Every group in one compiled graph (step_math); the state keeps adamw_math's layout, so checkpoints
        and the eager path are interchangeable."""
        adamw_groups, muon_groups = [], []
        for group in self.param_groups:
            params, grads = group["params"], [p.grad for p in group["params"]]
            if group["kind"] == "adamw":
                states = [self.state[p] for p in params]
                for p, st in zip(params, states):
                    if not st:
                        st.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                  exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                    st["step"] += 1
                t = states[0]["step"]
                if any(st["step"] != t for st in states):  # a param that once had no grad lags: keep exact Adam
                    b1, b2 = group["betas"]
                    for p, st in zip(params, states):
                        st["step"] -= 1
                        adamw_math(p, p.grad, st, group["lr"], b1, b2, group["eps"], group["weight_decay"])
                    continue
                b1, b2 = group["betas"]
                hp = self._hparams(group, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], wd=group["weight_decay"],
                                   bc1=1 - b1 ** t, bc2=1 - b2 ** t)
                adamw_groups.append((params, grads, [st["exp_avg"] for st in states],
                                     [st["exp_avg_sq"] for st in states], *hp))
            else:
                mom, var = self._muon_state(group, len(params), *params[0].shape, params[0].device)
                muon_groups.append((params, grads, mom, var, *self._muon_hparams(group), group["ns_steps"]))
        _step_fn()(adamw_groups, muon_groups, self._ortho_dtype(self.param_groups[0]["params"][0].device))

    def _step_distributed(self, rank, world):
        # Phase 1: launch every gradient reduction, group by group, without waiting.
        reductions = []  # one entry per group: list of (param, pending) or (stack, pending)
        for group in self.param_groups:
            if group["kind"] == "adamw":
                todo = []
                for p in group["params"]:
                    if p.grad is None:
                        # every rank must issue the same collectives: a missing grad counts as zero
                        p.grad = torch.zeros_like(p)
                    if p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % world == 0:
                        todo.append((p, "shard", _reduce_scatter_avg(p.grad, rank, world)))
                    else:  # small, or dim 0 not divisible by W: replicated state, full update on every rank
                        todo.append((p, "full", _all_reduce_avg(p.grad, world)))
                reductions.append(todo)
            else:
                ps = group["params"]
                c = -(-len(ps) // world)  # matrices owned per rank (the stack is zero-padded to c*world)
                stack = torch.zeros((c * world,) + ps[0].shape, dtype=torch.float32, device=ps[0].device)
                for i, p in enumerate(ps):
                    if p.grad is not None:
                        stack[i].copy_(p.grad)
                reductions.append((stack, c, _reduce_scatter_avg(stack, rank, world)))
        # Phase 2: per group, wait for its reduction, update the owned shard, launch the all-gather.
        gathers = []
        for group, red in zip(self.param_groups, reductions):
            if group["kind"] == "adamw":
                b1, b2 = group["betas"]
                for p, how, pending in red:
                    g = pending.wait()
                    if how == "full":
                        adamw_math(p, g, self.state[p], group["lr"], b1, b2, group["eps"], group["weight_decay"])
                        continue
                    s = p.shape[0] // world
                    p_slice = p[rank * s:(rank + 1) * s]
                    adamw_math(p_slice, g, self.state[p], group["lr"], b1, b2, group["eps"], group["weight_decay"])
                    gathers.append(_all_gather(p, p_slice, world))
            else:
                stack, c, pending = red
                g = pending.wait()                                    # (c, rows, cols) averaged grads
                ps = group["params"]
                lo, n_own = rank * c, max(0, min(c, len(ps) - rank * c))
                out = torch.zeros_like(g)                             # padding slots stay zero
                if n_own > 0:
                    owned = torch.stack(ps[lo:lo + n_own])
                    out[:n_own] = self._muon_group(group, g[:n_own].contiguous(), owned)
                # the reduced grad stack is free now: gather the new matrices into it
                gathers.append(_all_gather(stack, out, world))
                gathers.append(_Pending(None, lambda ps=ps, stack=stack: torch._foreach_copy_(
                    ps, [t.to(ps[0].dtype) for t in stack[:len(ps)].unbind(0)])))
        # Phase 3: wait for every gather (and copy the gathered Muon matrices into their params).
        for pending in gathers:
            pending.wait()

    # Per-rank state. Not torch's default load_state_dict: it would cast our fp32 moments to the param
    # dtype (bf16 embeddings on CUDA), which loses the exact resume.

    def state_dict(self):
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {index[p]: dict(s) for p, s in self.state.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        rank, world = self._dist_info()
        return {"state": state, "param_groups": groups, "world_size": world, "rank": rank}

    def load_state_dict(self, state_dict):
        rank, world = self._dist_info()
        if state_dict.get("world_size", 1) != world or state_dict.get("rank", 0) != rank:
            raise ValueError(f"optimizer state was saved by rank {state_dict.get('rank')} of world size "
                             f"{state_dict.get('world_size')}, but this is rank {rank} of {world}: optimizer "
                             "state is sharded per rank, resume with the same number of processes")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) or s["kind"] != g["kind"] for s, g in zip(saved, self.param_groups)):
            raise ValueError("optimizer state does not match this model's param groups (different model or config?)")
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(p.device, copy=True) if torch.is_tensor(v) else v) for k, v in s.items()}
        for g, s in zip(self.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
