"""Distribution, compilation and activation checkpointing, applied from outside the model.

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group: on CUDA one
group with two backends, NCCL for device tensors and gloo for host values (the step's target and token counts,
pass counts, objects), so a host value is never copied through the GPU, where its read-back would wait for
every kernel queued before it; gloo alone on CPU. A process group started elsewhere with NCCL only gets a gloo
group for host values on first use (`host_group`). `parallelize()` then wraps the bare model:

- activation checkpointing: each transformer block's forward runs under `torch.utils.checkpoint`
  (non-reentrant), called from inside the block's own forward so that compile traces it; parameter names do
  not change;
- compile: each block is compiled in place (`module.compile(fullgraph=True, dynamic=True)`), names unchanged.
  A block sees only tensors and ints (twinlm.model.Block), so one graph per kind of block (global or local
  attention, layer 0's missing norm) serves every packed layout; `fullgraph=True` makes a graph break an
  error instead of a silent fall back to eager; with checkpointing the checkpointed forward is compiled.
  With static shapes (train/static.py) the whole model is compiled instead, `dynamic=False` (one graph per
  phase and shape bucket), and with CUDA graphs in inductor's "reduce-overhead" mode;
- `ddp`: DistributedDataParallel (gradient all-reduce), with `gradient_as_bucket_view` (no second copy of
  the gradients);
- `fsdp`: FSDP2 `fully_shard` on each block, then on the root (parameters become DTensors sharded on dim 0);
  with `param_dtype=torch.bfloat16` (bf16 training on an accelerator) a mixed-precision policy gathers bf16
  parameters and reduces gradients in fp32 (the fp32 master weights stay sharded in the optimizer).

Faults (`init` and `peer_failure`): every collective waits at most a timeout, a longer one from the start until
the first step is done (`init_timeout_s`: start-up checks, shard verification, loading, compiling the first step)
than for the steps after it (`timeout_s`, set by `Trainer` once step 1 is done: `set_timeout`). A recipe sets
both (`dist_timeout`, `dist_init_timeout`), the environment overrides them (TWINLM_DIST_TIMEOUT,
TWINLM_DIST_INIT_TIMEOUT: seconds). When a collective times out (another rank hung) or its connection closes
(another rank died), `peer_failure` recognises the backend's error so the trainer can end with one line
(errors.PeerFailure) instead of every rank's traceback. `topology()` gathers every rank's host and node, the
launcher's restart count and a Slurm job's id for the run folder's provenance; `restart_warning()` names the
variable that multi-node restarts under torchrun need (TORCH_DISABLE_SHARE_RDZV_TCP_STORE, pytorch#135712).

Checkpoints always hold full tensors (`full_state_dict`, `load_full_state_dict`), so a run resumes on any
number of ranks and with or without FSDP. The tensors are gathered one at a time and copied to host memory
on the writing rank only (rank 0); the other ranks drop each gathered tensor on the device.
"""

from __future__ import annotations

import datetime
import os
import socket
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from twinlm.errors import ConfigError
from twinlm.train.static import GRAPHS_PER_MODEL

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0  # a collective's longest wait once the first step is done
    init_timeout_s: float = 1800.0  # and before (start-up, the first step's compile)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TIMEOUT_VARIABLE = "TWINLM_DIST_TIMEOUT"  # seconds a collective may wait once step 1 is done
INIT_TIMEOUT_VARIABLE = "TWINLM_DIST_INIT_TIMEOUT"  # seconds a collective may wait until then
RESTART_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # torch's fix for restarts across agents (#135712)


def timeout_from_env(name: str, default: float) -> float:
    """Seconds from the environment variable `name` (a positive number), else `default`."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise ConfigError(f"{name}={raw!r}: give a positive number of seconds (e.g. {name}=300), or unset it")
    return value


def init(device: str | None = None, *, timeout_s: float = 600.0, init_timeout_s: float = 1800.0) -> DistEnv:
    """Start the process group under torchrun (WORLD_SIZE > 1), its collectives waiting at most the start-up
    timeout (`init_timeout_s`, TWINLM_DIST_INIT_TIMEOUT overrides it); the returned env carries both timeouts
    (`timeout_s` after TWINLM_DIST_TIMEOUT) for `set_timeout` once the first step is done."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout_s = timeout_from_env(TIMEOUT_VARIABLE, timeout_s)
    init_timeout_s = timeout_from_env(INIT_TIMEOUT_VARIABLE, init_timeout_s)
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dev), timeout=datetime.timedelta(seconds=init_timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        _TIMEOUT[:] = [init_timeout_s]
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, timeout_s=timeout_s,
                   init_timeout_s=init_timeout_s)


def set_timeout(seconds: float) -> None:
    """How long this rank's collectives wait from now on (the default group and the host group beside it). Local:
    each rank sets its own; the trainer does so on every rank once the first step is done."""
    if not dist.is_initialized():
        return
    delta = datetime.timedelta(seconds=seconds)
    _TIMEOUT[:] = [seconds]
    dist.distributed_c10d._set_pg_timeout(delta)
    for group in _HOST_GROUP.values():
        dist.distributed_c10d._set_pg_timeout(delta, group)


# what the backends say when a peer hung (a timeout) or died (a closed connection). Measured with gloo only: on
# CUDA, NCCL's watchdog may end the process itself at the same timeout, with its own message, before a host
# collective (gloo) raises one that the trainer can put in one line
_HUNG = ("timed out", "timeout")
_DIED = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
         "remote worker crashing", "connectfullmesh", "socket closed")


def peer_failure(error: BaseException) -> str | None:
    """"hung" when `error` is a collective's timeout, "died" when a peer's connection closed, else None (not a
    fault of another rank: a bug or a user error of this one)."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    backend = isinstance(error, dist.DistError) or "gloo" in text or "nccl" in text or "c10d" in text
    if not backend:
        return None
    if any(k in text for k in _DIED):
        return "died"
    if any(k in text for k in _HUNG):
        return "hung"
    return "died" if isinstance(error, dist.DistNetworkError) else None


def host() -> str:
    return socket.gethostname()


def topology(env: DistEnv) -> dict[str, Any]:
    """Where the run's ranks are (collective: every rank calls it): the number of nodes (torchrun's agents:
    GROUP_RANK, else distinct hosts), every rank's host, node and local rank, the launcher's restart count and
    limit (torchrun's TORCHELASTIC_RESTART_COUNT / _MAX_RESTARTS) and a Slurm job's id, node list and requeue
    count (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_RESTART_COUNT)."""
    e = os.environ
    me = {"rank": env.rank, "host": host(), "node": int(e.get("GROUP_RANK", "0")), "local_rank": env.local_rank}
    ranks = all_gather_object(me)
    nodes = len({(r["host"], r["node"]) for r in ranks})
    out: dict[str, Any] = {"nodes": nodes, "world_size": env.world_size, "ranks": ranks,
                           "restart": int(e.get("TORCHELASTIC_RESTART_COUNT", "0")),
                           "max_restarts": int(e.get("TORCHELASTIC_MAX_RESTARTS", "0"))}
    if e.get("SLURM_JOB_ID"):
        out["slurm"] = {"job_id": e["SLURM_JOB_ID"], "nodelist": e.get("SLURM_JOB_NODELIST"),
                        "restart_count": int(e.get("SLURM_RESTART_COUNT", "0"))}
    return out


def restart_warning(topo: dict[str, Any]) -> str | None:
    """The warning for torchrun restarts across nodes without RESTART_VARIABLE in the agents' environment
    (which their workers inherit): a restart then hangs in the process group's set-up or fails to connect
    (pytorch#135712). None when nothing is wrong."""
    if topo["max_restarts"] > 0 and topo["nodes"] > 1 and os.environ.get(RESTART_VARIABLE) != "1":
        return (f"warning: torchrun restarts (--max-restarts {topo['max_restarts']}) across {topo['nodes']} nodes "
                f"need {RESTART_VARIABLE}=1 in every agent's environment, else a restart hangs or fails to "
                f"connect (pytorch/pytorch#135712): export {RESTART_VARIABLE}=1 before torchrun")
    return None


def backend_for(device: torch.device) -> str:
    """The process group's backends for training on `device`: NCCL for CUDA tensors beside gloo for host ones."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


_HOST_GROUP: dict = {}  # default group -> the gloo group host_group() made beside it
_TIMEOUT: list[float] = []  # the collectives' timeout last set by init / set_timeout (the host group's)


def host_group():
    """The group that carries host (CPU) tensors and objects: None (the default group) when the default group
    has a CPU backend, as `init()` makes it; else (a group started with NCCL alone) a gloo group over the same
    ranks, made once per default group, on first use. Making it is a collective: every rank reaches it at the
    same host collective."""
    if "cpu:" in dist.get_backend_config():
        return None
    world = dist.group.WORLD
    if world not in _HOST_GROUP:
        _HOST_GROUP.clear()  # one made beside an earlier, destroyed default group
        timeout = datetime.timedelta(seconds=_TIMEOUT[0]) if _TIMEOUT else None
        _HOST_GROUP[world] = dist.new_group(backend="gloo", timeout=timeout)
    return _HOST_GROUP[world]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP.clear()
    _TIMEOUT.clear()


def _several() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce of a small tensor: a device tensor over the device's backend, queued (nothing waits);
    a host tensor over the host group (gloo), never through the device."""
    if _several():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=host_group() if t.device.type == "cpu" else None)
    return t


def barrier() -> None:
    """Every rank has reached this point on the host: an all-reduce of a host value (a device barrier would
    also wait for the kernels queued before it)."""
    if _several():
        all_reduce(torch.zeros(1))


def broadcast_object(obj, src: int = 0):
    if _several():
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=host_group())
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    if _several():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=host_group())
        return out
    return [obj]


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: `model.layers` if present, else the largest ModuleList."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError("cannot find the transformer blocks (no nn.ModuleList in the model)")
    return max(lists, key=len)


def resolve_precision(precision: str, device: torch.device) -> str:
    """A recipe's `precision` on `device`: "auto" is "bf16" on CUDA and "fp32" elsewhere; "bf16" and "fp32"
    stay as they are. The one rule of the step's autocast and of FSDP's parameter dtype."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def compute_dtype(precision: str, env: DistEnv) -> torch.dtype | None:
    """FSDP's parameter dtype for a recipe's `precision`: bf16 where training runs under bf16 autocast on an
    accelerator (resolve_precision gives "bf16" on CUDA), else None (fp32 parameters)."""
    if env.device.type == "cuda" and resolve_precision(precision, env.device) == "bf16":
        return torch.bfloat16
    return None


def _checkpointed_forward(block: torch.nn.Module, *args):
    """The block's own forward under non-reentrant checkpointing (bound to the block as its `forward`)."""
    return checkpoint(type(block).forward, block, *args, use_reentrant=False)


def parallelize(model: torch.nn.Module, env: DistEnv, *, mode: str = "auto", compile: bool = False,
                activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None,
                compile_backend: str = "inductor", static_shapes: bool = False,
                cuda_graphs: bool = False) -> torch.nn.Module:
    """Wrap `model` for training; returns the module to call (the bare model stays reachable via unwrap()).

    `param_dtype`: FSDP's parameter dtype for compute (bf16 with fp32 gradient reduction); None keeps fp32.
    `compile_backend`: torch.compile's backend (tests use "aot_eager", which traces the same graphs).
    `static_shapes` (every micro-batch of a phase has one shape: train/static.py): with `compile`, the whole
    model is compiled at once (`fullgraph=True, dynamic=False`: head, gather and loss included), except under
    FSDP, whose blocks are compiled one by one, at static shapes. `cuda_graphs`: that whole-model compile in
    inductor's "reduce-overhead" mode, which replays CUDA graphs."""
    blocks = blocks_of(model)
    if activation_checkpointing:
        for block in blocks:
            block.forward = types.MethodType(_checkpointed_forward, block)
    if mode == "auto":
        mode = "ddp" if env.distributed else "none"
    sharded = mode == "fsdp" and env.distributed
    if compile and static_shapes and not sharded:
        graphs = {"mode": "reduce-overhead"} if cuda_graphs else {}
        # one graph per document bucket and mode (train/static.py): more than dynamo's default 8 over a run
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_MODEL)
        model.compile(fullgraph=True, dynamic=False, backend=compile_backend, **graphs)
    elif compile:
        for block in blocks:
            block.compile(fullgraph=True, dynamic=not static_shapes, backend=compile_backend)
    if sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # FSDP only: ~1 s to import
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kw: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    if mode in ("ddp", "fsdp") and env.distributed:  # fsdp on one rank degenerates to plain training
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def full_tensor(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """A CPU copy of the whole tensor (gathered from the ranks when `t` is an FSDP shard: collective), or None
    where `keep` is false: the gathered copy is dropped on the device, so only the writer holds host memory."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu() if keep else None


def place_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` on `param`'s device, sharded like `param` when that is an FSDP shard (the inverse of full_tensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor  # DTensor: FSDP only, ~1 s to import
        shard = cast("DTensor", param)
        return distribute_tensor(full.to(param.device), shard.device_mesh, shard.placements)
    return full.to(param.device).clone()


def full_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of the model's state dict; call on every rank (FSDP gathers). With
    `keep=False` (the ranks that do not write) the tensors are gathered one at a time and dropped: {}."""
    out = {k: full_tensor(v, keep) for k, v in unwrap(model).state_dict().items()}
    return cast("dict[str, torch.Tensor]", out) if keep else {}  # kept: every value is a tensor


def _assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor  # DTensor: FSDP only, ~1 s to import
        d = cast("DTensor", dst)
        shard = distribute_tensor(full.to(dst.device, dst.dtype), d.device_mesh, d.placements)
        d.to_local().copy_(shard.to_local())
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the (possibly sharded) model in place; missing/unexpected keys are errors,
    except tied aliases (a key whose tensor shares storage with another key that was given)."""
    own = unwrap(model).state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    if missing:
        # tied weights are stored once; accept a missing key whose storage is shared with a present one
        ptr: dict[int, list[str]] = {}
        for k, v in own.items():
            ptr.setdefault(_ptr(v), []).append(k)
        missing = [k for k in missing if not any(o in state for o in ptr[_ptr(own[k])])]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        _assign(own[k], v)


def _ptr(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.untyped_storage().data_ptr() if t.numel() else id(t)
