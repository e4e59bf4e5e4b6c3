"""Tiger under FSDP2 (torch.distributed.fsdp.fully_shard) on CPU/gloo: two ranks match one process.

RMS scaling, per-row RMS, lazy rows and the NaN test must see the whole (unsharded) tensor. The model mixes every
parameter kind, shards an embedding along its last dimension (so row statistics cross ranks) and the rest along
dim 0 with uneven shards, accumulates over two micro-batches, and gets a NaN on one rank's shard only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_su.trainer.tiger import Tiger, tiger_param_groups

WORLD = 2
VOCAB, USED = 11, 8  # tokens USED.. never occur: their (lazy) rows must stay put on every rank


class _ToyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.proj = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(torch.tanh(self.proj(self.embed(ids)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def _worker(rank: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = _ToyLM()
        reference = copy.deepcopy(model)
        per_tensor = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (WORLD,))
        for sharded in (model, per_tensor):
            fully_shard(sharded.embed, mesh=mesh, shard_placement_fn=lambda p: Shard(p.ndim - 1))
            fully_shard(sharded, mesh=mesh)
        assert model.embed.weight.placements == (Shard(1),) and model.proj.weight.placements == (Shard(0),)

        try:
            Tiger(model.parameters(), step_in_backward=True)
            raise AssertionError("step_in_backward accepted DTensor parameters")
        except TypeError as err:
            assert "DTensor" in str(err)

        opt = Tiger(tiger_param_groups(model, weight_decay=0.1), lr=0.05, beta=0.9, grad_accum_steps=2)
        pt_opt = Tiger(
            tiger_param_groups(per_tensor, weight_decay=0.1), lr=0.05, beta=0.9, grad_accum_steps=2, foreach=False
        )
        ref_opt = Tiger(tiger_param_groups(reference, weight_decay=0.1), lr=0.05, beta=0.9, grad_accum_steps=2)
        gen = torch.Generator().manual_seed(1)
        for t in range(8):
            ids = torch.randint(0, USED, (2 * WORLD, 5), generator=gen)
            model(ids.chunk(WORLD)[rank]).backward()
            per_tensor(ids.chunk(WORLD)[rank]).backward()
            reference(ids).backward()
            if t == 5:  # NaN on rank 0's shard only: every rank must skip-and-shrink this tensor
                if rank == 0:
                    model.proj.weight.grad.to_local()[0, 0] = float("nan")
                    per_tensor.proj.weight.grad.to_local()[0, 0] = float("nan")
                reference.proj.weight.grad[0, 0] = float("nan")
            for optimizer in (opt, pt_opt, ref_opt):
                optimizer.step()
                optimizer.zero_grad()

        for (name, p), q, ref in zip(model.named_parameters(), per_tensor.parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
            assert torch.equal(p.to_local(), q.to_local()), name  # multi-tensor == per-tensor, sharded too
        assert torch.equal(reference.embed.weight[USED:], _initial_embedding()[USED:])
    finally:
        dist.destroy_process_group()


def _initial_embedding() -> torch.Tensor:
    torch.manual_seed(0)
    return _ToyLM().embed.weight.detach()


@pytest.mark.distributed
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
