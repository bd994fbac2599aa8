"""Data-parallel training on 2 local processes (gloo on loopback) equals single-process training
on the same global batch: the functional train step, and torch_compat's module tree inside DDP and
under FSDP2 (``fully_shard`` on its blocks and on the model, as on torchvision's models)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vafunc
from vafunc.training import optim
from vafunc.training.train import make_train_step

# AlexNet has no BatchNorm, so the mean of the shards' gradients is exactly the global-batch gradient
NAME, KW, STEPS, BATCH, SIZE = "alexnet", {"num_classes": 5, "dropout": 0.0}, 3, 8, 63


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def _worker(rank, world, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = vafunc.get_model(NAME, **KW)
        params, state = model.init(rank)  # different on purpose: the broadcast must fix it
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if mode == "functional":
            params, state = vafunc.training.distributed.broadcast_tree((params, state))
            opt = optim.sgd(0.05, momentum=0.9)
            opt_state = opt.init(params)
            step = make_train_step(model, opt, distributed=True)
            for x, y in _data():
                params, state, opt_state, _ = step(params, state, opt_state, x[shard], y[shard])
            result = vafunc.to_state_dict(params, state)
        else:
            import torch_compat

            module = torch_compat.from_model(model, *model.init(0))
            if mode == "ddp":
                net = torch.nn.parallel.DistributedDataParallel(module)
            else:  # FSDP2 as on torchvision's models: every block (AlexNet's two Sequentials), then the model
                from torch.distributed.fsdp import fully_shard

                for block in (module.features, module.classifier):
                    fully_shard(block)
                net = fully_shard(module)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            for x, y in _data():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[shard]), y[shard]).backward()
                opt.step()
            result = {
                k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                for k, v in module.state_dict().items()
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(mode):
    model = vafunc.get_model(NAME, **KW)
    params, state = model.init(0)
    if mode == "functional":
        opt = optim.sgd(0.05, momentum=0.9)
        opt_state = opt.init(params)
        step = make_train_step(model, opt)
        for x, y in _data():
            params, state, opt_state, _ = step(params, state, opt_state, x, y)
        return vafunc.to_state_dict(params, state)
    import torch_compat

    module = torch_compat.from_model(model, params, state)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "mode",
    [pytest.param(m, marks=pytest.mark.slow) for m in ("fsdp2", "functional", "ddp")],  # two processes each: ~45 s
)
def test_two_processes_equal_single_process(tmp_path, mode):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
    want = _single_process("functional" if mode == "functional" else "module")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(got) == list(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {k}")


def test_all_reduce_outside_a_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        vafunc.training.distributed.all_reduce_mean({"w": torch.ones(2)})
